"""What every actor process shares: start-up hygiene (the cyclic garbage
collector) and loading a user's object by name.

A full (generation 2) collection walks every container object alive: with
torch and Ray imported and a replica's block pool built that is ~270k objects,
0.1 s on a fast core and several times that on a GPU host's, and it stops the
thread that triggered it: a scheduler step or an SSE write. Objects alive at
the end of start-up (modules, the model, the block pool) live as long as the
process, so they are moved out of the collector's reach once (`gc.freeze`,
as vLLM does); what is made later is collected as usual.
"""

from __future__ import annotations

import gc
import importlib
import os
import time


def freeze_startup_heap() -> None:
    """Freeze what is alive now (ZIGGURAT_GC_FREEZE=0 turns it off, for A/B runs)."""
    if os.environ.get("ZIGGURAT_GC_FREEZE", "1") == "0":
        return
    gc.collect()
    gc.freeze()


class GCPauses:
    """Time spent in the collector in this process, per generation (for stats)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            g = info["generation"]
            self.seconds[g] += time.perf_counter() - self._start
            self.count[g] += 1


def load_object(spec: str):
    """'package.module:Name' -> the object (a worker class, a redaction hook)."""
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name:
        raise ValueError(f"expected 'package.module:Name', got {spec!r}")
    return getattr(importlib.import_module(mod), name)


LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str | None = None) -> None:
    """The `ziggurat` loggers' level in this process: `level`, else $ZIGGURAT_LOG_LEVEL
    (the launcher puts it in every actor's environment), else warning. One handler
    writes to stderr (Ray collects actors' stderr into their log files and the driver)."""
    import logging

    name = (level or os.environ.get("ZIGGURAT_LOG_LEVEL") or "warning").lower()
    if name not in LEVELS:
        raise ValueError(f"log_level: must be one of {', '.join(LEVELS)}, got {name!r}")
    logger = logging.getLogger("ziggurat")
    logger.setLevel(name.upper())
    if not logger.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(h)
        logger.propagate = False
