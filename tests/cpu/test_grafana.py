"""The Grafana dashboard: valid JSON, and every metric its panels query exists in the registry."""

from __future__ import annotations

import json
import pathlib
import re

from ziggurat.actors import metrics

DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "ziggurat.json"


def exported() -> set[str]:
    names = set()
    for m in metrics.ALL:
        names.add(m.exported_name)
        if m.kind == "histogram":
            names |= {m.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def test_every_panel_queries_metrics_that_exist():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["panels"] and dash["uid"]
    known = exported()
    seen = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            names = set(re.findall(r"\bziggurat_[a-z0-9_]+", t["expr"]))
            assert names, (panel["title"], t["expr"])
            assert names <= known, (panel["title"], names - known)
            seen |= names
    for v in dash["templating"]["list"]:
        assert set(re.findall(r"\bziggurat_[a-z0-9_]+", v.get("query", ""))) <= known
    # The serving quantities an operator looks at first are all on it.
    for m in (metrics.TTFT, metrics.ITL, metrics.E2E, metrics.QUEUE):
        assert m.name + "_bucket" in seen
