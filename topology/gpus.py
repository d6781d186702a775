"""What GPUs this node has (NVML), for placement, metering and telemetry."""

from __future__ import annotations


def local_gpu_info() -> dict:
    """{'count': n, 'name': 'NVIDIA H100 80GB HBM3', 'memory_bytes': ...}; count 0 without NVML/GPUs."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return {"count": 0, "name": "cpu", "memory_bytes": 0}
    try:
        n = pynvml.nvmlDeviceGetCount()
        if n == 0:
            return {"count": 0, "name": "cpu", "memory_bytes": 0}
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else name
        return {"count": n, "name": name, "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total)}
    finally:
        pynvml.nvmlShutdown()
