"""GPU topology from recorded NVML answers (8 GPUs on NVSwitch, 4+4 NVLink islands,
PCIe only, one GPU) and the placement check that fails at once, naming what is
missing, when no node can hold a replica."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ziggurat.topology import nvml
from ziggurat.topology.placement import check_fits, replica_bundles


class FakeNVML:
    """The pynvml calls topology/nvml.py makes, answered from a recorded topology:
    links[i] = remote ends of GPU i's active NVLinks ("sw" for an NVSwitch, or a GPU index)."""

    NVML_NVLINK_DEVICE_TYPE_SWITCH = 1

    def __init__(self, n, links, name="NVIDIA H200", numa=None):
        self.n, self.links, self.name, self.numa = n, links, name, numa or [0] * n

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return self.n

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    @staticmethod
    def bus(i):
        return f"00000000:{0x18 + 0x10 * i:02X}:00.0"

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=self.bus(h).encode())

    def nvmlDeviceGetNvLinkState(self, h, link):
        if self.links is None:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        if link >= len(self.links[h]):
            raise RuntimeError("NVML_ERROR_INVALID_ARGUMENT")
        return 1

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, h, link):
        return 1 if self.links[h][link] == "sw" else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        return SimpleNamespace(busId=self.bus(self.links[h][link]))

    def nvmlDeviceGetNumaNodeId(self, h):
        return self.numa[h]

    def nvmlDeviceGetName(self, h):
        return self.name

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h:08d}"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=143771 << 20)

    def nvmlSystemGetDriverVersion(self):
        return "580.159.04"


RECORDED = {
    "8x NVSwitch": (FakeNVML(8, [["sw"] * 18 for _ in range(8)], numa=[0, 0, 0, 0, 1, 1, 1, 1]), [list(range(8))], 8),
    "4+4 islands": (FakeNVML(8, [[j for j in range(4 * (i // 4), 4 * (i // 4) + 4) if j != i] * 4 for i in range(8)]),
                    [[0, 1, 2, 3], [4, 5, 6, 7]], 4),
    "PCIe only": (FakeNVML(4, None, name="NVIDIA L40S"), [[0], [1], [2], [3]], 1),
    "1 GPU": (FakeNVML(1, None), [[0]], 1),
}


@pytest.mark.parametrize("name", list(RECORDED))
def test_islands_from_recorded_topologies(name, tmp_path):
    fake, islands, largest = RECORDED[name]
    (tmp_path / "mlx5_0").mkdir()
    topo = nvml.read(fake, ib_dir=str(tmp_path))
    assert topo.islands() == islands and topo.largest_island == largest
    assert [g.pci_bus_id for g in topo.gpus] == [FakeNVML.bus(i) for i in range(fake.n)]
    assert topo.ib_hcas == ("mlx5_0",) and topo.driver == "580.159.04"
    assert nvml.resources(topo) == {"ziggurat_nvlink_island": float(largest), "ziggurat_ib": 1.0}
    s = topo.summary()
    assert len(s["gpus"]) == fake.n and s["islands"] == islands
    if name == "8x NVSwitch":
        assert [g.numa_node for g in topo.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_no_nvml_reads_as_no_gpus():
    class Broken(FakeNVML):
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    topo = nvml.read(Broken(0, None), ib_dir="/nonexistent")
    assert topo.gpus == () and topo.islands() == [] and nvml.resources(topo) == {}
    assert "NVML Shared Library Not Found" in topo.errors[0]


def node(addr, **res):
    return {"Alive": True, "NodeManagerAddress": addr, "Resources": res}


def test_placement_check_names_what_is_missing():
    nodes = [node("10.0.0.1", CPU=16, GPU=1, ziggurat_nvlink_island=1), node("10.0.0.2", CPU=8)]
    assert check_fits(nodes, replica_bundles(1, True), "replica 0") is None
    why = check_fits(nodes, replica_bundles(2, True), "replica 0 (prefill, TP 2)")
    assert why.startswith("replica 0 (prefill, TP 2): no node can hold its 2 worker(s) together")
    assert "GPU 2 (the closest node has 1)" in why and "10.0.0.1" in why
    pinned = replica_bundles(1, False, resources={"decode_node": 1})
    why = check_fits(nodes, pinned, "replica 1 (decode, TP 1)")
    assert "decode_node 1 (the closest node has 0)" in why
    assert check_fits([], pinned, "r") == "r: the Ray cluster has no alive node"
    # Two workers sharing one GPU fit on it.
    assert check_fits(nodes, replica_bundles(2, True, gpus_per_worker=0.5), "r") is None


def test_a_deployment_the_cluster_cannot_hold_fails_at_once(ray_cluster, llama_dir):
    import time

    from conftest import free_port
    from ziggurat.cluster.deploy import Deployment
    from ziggurat.cluster.spec import DeploymentSpec, PoolSpec

    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        Deployment(DeploymentSpec.from_flat(model=str(llama_dir), port=free_port(), device="cpu", num_kv_blocks=64,
                                            pools=(PoolSpec("mixed", 1, resources={"no_such_node": 1}),)))
    assert time.monotonic() - t0 < 30
    assert "no_such_node 1 (the closest node has 0)" in str(e.value)


class FakeHealthNVML(FakeNVML):
    """Adds the health and telemetry calls, with faults to inject."""

    NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC, NVML_TEMPERATURE_GPU, NVML_CLOCK_SM = 1, 0, 0, 1
    nvmlEventTypeXidCriticalError = 8

    def __init__(self):
        super().__init__(1, None)
        self.ecc, self.xids, self.lost, self.pending = 0, [], False, 0

    def nvmlDeviceGetName(self, h):
        if self.lost:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST: GPU is lost")
        return self.name

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        return self.ecc

    def nvmlEventSetCreate(self):
        return "set"

    def nvmlDeviceRegisterEvents(self, h, kinds, events):
        pass

    def nvmlEventSetWait(self, events, timeout_ms):
        if not self.xids:
            raise RuntimeError("NVML_ERROR_TIMEOUT")
        return SimpleNamespace(eventData=self.xids.pop(0))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h):
        return self.pending

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=87)

    def nvmlDeviceGetPowerUsage(self, h):
        return 512000

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 61

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980


def test_gpu_health_problems_and_telemetry():
    from ziggurat.topology.gpu_health import GpuMonitor

    fake = FakeHealthNVML()
    mon = GpuMonitor(0, fake)
    problems, tel = mon.poll()
    assert problems == [] and tel["utilization"] == 87 and tel["power_watts"] == 512.0
    assert tel["temperature_c"] == 61 and tel["sm_clock_mhz"] == 1980 and tel["ecc_uncorrected"] == 0
    fake.xids, fake.ecc = [79], 2
    problems, _ = mon.poll()
    assert problems == ["GPU 0: XID 79 (critical error)", "GPU 0: 2 uncorrected ECC error(s) since start"]
    assert mon.poll()[0] == []  # a lasting condition is reported once
    fake.pending = 1
    assert mon.poll()[0] == ["GPU 0: retired pages pending (needs a reset)"]
    fake.lost = True
    assert "fallen off the bus" in mon.poll()[0][0]


def test_gpu_errors_end_a_replicas_health():
    from ziggurat.actors.scheduler.messages import ReplicaHealth
    from ziggurat.cluster.supervisor import judge

    ok = ReplicaHealth(0, "i", False, True, 1.0)
    assert judge(ok, step_deadline_s=60) is None
    bad = ReplicaHealth(0, "i", False, False, 0.0, ("GPU 0: XID 79 (critical error)",))
    assert judge(bad, step_deadline_s=60) == "GPU error: GPU 0: XID 79 (critical error)"
