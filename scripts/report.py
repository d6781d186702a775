"""How every benchmark script ends: one JSON line on stdout, the same line in --json if given."""

from __future__ import annotations

import json


def emit(result: dict, path: str | None) -> None:
    line = json.dumps(result)
    print(line)
    if path:
        with open(path, "w") as f:
            f.write(line + "\n")
