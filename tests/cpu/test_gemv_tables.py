"""The decode GEMV's launch configs per GPU: the H200's table sends qkv and gate_up to
cuBLAS (None), an unknown GPU gets the nearest measured table (the H100's)."""

from __future__ import annotations

import torch

from ziggurat.kernels import gemv_triton as G


def test_tables_by_gpu_name(monkeypatch):
    names = {0: "NVIDIA H200", 1: "NVIDIA H100 80GB HBM3", 2: "NVIDIA A100-SXM4-80GB"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: names[i])
    monkeypatch.setattr(G, "_tables", {})
    h200, h100, other = (torch.device("cuda", i) for i in range(3))
    assert G.config_for(h200, 6144, 4096) is None and G.config_for(h200, 28672, 4096) is None
    assert G.config_for(h200, 4096, 4096) == (4, 1024, 4, 2)
    assert G.config_for(h100, 6144, 4096) == (16, 1024, 4, 1)
    assert G.table_for(other) is G.TABLES["H100"]
    assert G.config_for(h200, 1000, 1000) == G.DEFAULT_CONFIG  # a shape nobody measured
    for table in G.TABLES.values():
        for cfg in table.values():
            assert cfg is None or (len(cfg) == 4 and all(isinstance(v, int) and v > 0 for v in cfg))
