"""A node's GPU topology through NVML: GPUs, NVLink islands, NUMA affinity, InfiniBand HCAs.

    topo = read()                  # this node (NodeTopology; no GPU or no NVML: zero GPUs)
    topo.islands()                 # GPUs grouped by NVLink reach: [[0..7]] on NVSwitch, [[0..3], [4..7]] on 4+4
    resources(topo)                # what `ray start --resources` advertises (`ziggurat topology resources`)

`read` takes the NVML module as an argument so recorded topologies (tests)
go through the same code as a real GPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

NVLINK_MAX = 18  # NVML_NVLINK_MAX_LINKS on Hopper


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    uuid: str
    memory_bytes: int
    pci_bus_id: str
    numa_node: int | None = None
    # NVLink: per active link, the remote end: a GPU's PCI bus id, or "nvswitch".
    nvlinks: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeTopology:
    gpus: tuple[GPU, ...] = ()
    ib_hcas: tuple[str, ...] = ()  # InfiniBand / RoCE devices (mlx5_0, ...)
    driver: str = ""
    errors: tuple[str, ...] = field(default_factory=tuple)  # what could not be read (XID, ECC, ...: per GPU)

    def islands(self) -> list[list[int]]:
        """GPU indices grouped by NVLink reach (connected components; every GPU on an
        NVSwitch fabric is in one island; a GPU without NVLink is an island of one)."""
        by_bus = {g.pci_bus_id.lower(): g.index for g in self.gpus}
        parent = {g.index: g.index for g in self.gpus}

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        switched = [g.index for g in self.gpus if "nvswitch" in g.nvlinks]
        for a, b in zip(switched, switched[1:]):
            parent[find(a)] = find(b)
        for g in self.gpus:
            for remote in g.nvlinks:
                j = by_bus.get(remote.lower())
                if j is not None:
                    parent[find(g.index)] = find(j)
        groups: dict[int, list[int]] = {}
        for g in self.gpus:
            groups.setdefault(find(g.index), []).append(g.index)
        return sorted(groups.values())

    @property
    def largest_island(self) -> int:
        return max((len(i) for i in self.islands()), default=0)

    def summary(self) -> dict:
        return {"gpus": [{"index": g.index, "name": g.name, "memory_gib": round(g.memory_bytes / 2**30, 1),
                          "pci": g.pci_bus_id, "numa": g.numa_node, "nvlinks": len(g.nvlinks)} for g in self.gpus],
                "islands": self.islands(), "ib_hcas": list(self.ib_hcas), "driver": self.driver,
                "errors": list(self.errors)}


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def read(nvml=None, ib_dir: str = "/sys/class/infiniband") -> NodeTopology:
    """This node's topology (nvml: the pynvml module, or a recording with its calls)."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return NodeTopology(errors=("nvidia-ml-py is not installed",))
    try:
        nvml.nvmlInit()
    except Exception as e:
        return NodeTopology(ib_hcas=_hcas(ib_dir), errors=(f"NVML: {e}",))
    try:
        gpus, errors = [], []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            pci = _s(nvml.nvmlDeviceGetPciInfo(h).busId)
            links = []
            for link in range(NVLINK_MAX):
                try:
                    if not nvml.nvmlDeviceGetNvLinkState(h, link):
                        continue
                except Exception:  # not supported (PCIe-only GPU) or past the last link
                    break
                try:
                    kind = nvml.nvmlDeviceGetNvLinkRemoteDeviceType(h, link)
                except Exception:
                    kind = None
                if kind == getattr(nvml, "NVML_NVLINK_DEVICE_TYPE_SWITCH", 1):
                    links.append("nvswitch")
                else:
                    links.append(_s(nvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId))
            try:
                numa = int(nvml.nvmlDeviceGetNumaNodeId(h))
            except Exception:
                numa = None
            gpus.append(GPU(i, _s(nvml.nvmlDeviceGetName(h)), _s(nvml.nvmlDeviceGetUUID(h)),
                            int(nvml.nvmlDeviceGetMemoryInfo(h).total), pci, numa, tuple(links)))
        try:
            driver = _s(nvml.nvmlSystemGetDriverVersion())
        except Exception:
            driver = ""
        return NodeTopology(tuple(gpus), _hcas(ib_dir), driver, tuple(errors))
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def _hcas(ib_dir: str) -> tuple[str, ...]:
    try:
        return tuple(sorted(os.listdir(ib_dir)))
    except OSError:
        return ()


def resources(topo: NodeTopology) -> dict[str, float]:
    """Custom resources a node advertises at `ray start` (the placement check reads them):
    ziggurat_nvlink_island: its largest NVLink island's GPU count (a TP group wants one
    that holds it whole); ziggurat_ib: 1 when it has InfiniBand HCAs."""
    out: dict[str, float] = {}
    if topo.gpus:
        out["ziggurat_nvlink_island"] = float(topo.largest_island)
    if topo.ib_hcas:
        out["ziggurat_ib"] = 1.0
    return out


def resources_json(topo: NodeTopology | None = None) -> str:
    return json.dumps(resources(read() if topo is None else topo))
