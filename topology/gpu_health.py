"""GPU health and telemetry of one worker's GPU, through NVML.

    mon = GpuMonitor(device_index)       # in the worker process, for its GPU
    problems, telemetry = mon.poll()     # new problems since the last poll; a reading

Problems (each ends the replica's health: the supervisor replaces it):
  * an XID critical error event (nvmlEventTypeXidCriticalError), with its code;
  * uncorrected ECC errors beyond those counted when the worker started;
  * retired pages pending / a failed row remap (the GPU needs a reset);
  * the GPU fallen off the bus (NVML answers GpuIsLost).
Telemetry: utilization, memory used, power, temperature, SM clock, ECC counts.

Takes the NVML module as an argument so tests drive it with recorded answers.
"""

from __future__ import annotations


class GpuMonitor:
    def __init__(self, index: int = 0, nvml=None):
        self.ok = False
        self.problems_seen: list[str] = []
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                return
        self.nvml = nvml
        try:
            nvml.nvmlInit()
            self.h = nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:
            return
        self.ok = True
        self.index = index
        self.ecc0 = self._ecc()
        self.events = None
        try:
            self.events = nvml.nvmlEventSetCreate()
            nvml.nvmlDeviceRegisterEvents(self.h, nvml.nvmlEventTypeXidCriticalError, self.events)
        except Exception:  # not supported here (some virtualized GPUs): ECC and bus checks still run
            self.events = None

    def _ecc(self) -> int | None:
        n = self.nvml
        try:
            return int(n.nvmlDeviceGetTotalEccErrors(self.h, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                                     n.NVML_VOLATILE_ECC))
        except Exception:
            return None

    def poll(self) -> tuple[list[str], dict]:
        if not self.ok:
            return [], {}
        n, h, problems, tel = self.nvml, self.h, [], {}
        try:
            n.nvmlDeviceGetName(h)
        except Exception as e:
            if "lost" in type(e).__name__.lower() or "lost" in str(e).lower():
                problems.append(f"GPU {self.index} has fallen off the bus ({e})")
                return self._new(problems), {}
        if self.events is not None:
            while True:
                try:
                    ev = n.nvmlEventSetWait(self.events, 0)
                except Exception:  # timeout: no event
                    break
                problems.append(f"GPU {self.index}: XID {getattr(ev, 'eventData', '?')} (critical error)")
        ecc = self._ecc()
        if ecc is not None and self.ecc0 is not None and ecc > self.ecc0:
            problems.append(f"GPU {self.index}: {ecc - self.ecc0} uncorrected ECC error(s) since start")
        try:
            if n.nvmlDeviceGetRetiredPagesPendingStatus(h):
                problems.append(f"GPU {self.index}: retired pages pending (needs a reset)")
        except Exception:
            pass
        try:
            remap = n.nvmlDeviceGetRemappedRows(h)  # (correctable, uncorrectable, pending, failure)
            if remap[3]:
                problems.append(f"GPU {self.index}: row remapping failed")
        except Exception:
            pass
        for key, fn in (("utilization", lambda: n.nvmlDeviceGetUtilizationRates(h).gpu),
                        ("memory_used_bytes", lambda: n.nvmlDeviceGetMemoryInfo(h).used),
                        ("power_watts", lambda: n.nvmlDeviceGetPowerUsage(h) / 1000.0),
                        ("temperature_c", lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
                        ("sm_clock_mhz", lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM))):
            try:
                tel[key] = float(fn())
            except Exception:
                pass
        if ecc is not None:
            tel["ecc_uncorrected"] = float(ecc)
        return self._new(problems), tel

    def _new(self, problems: list[str]) -> list[str]:
        """Problems not reported before (a lasting condition is reported once)."""
        new = [p for p in problems if p not in self.problems_seen]
        self.problems_seen += new
        return new
