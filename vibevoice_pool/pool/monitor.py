"""Monitor: a sampler thread that fills the board's device columns.

Every `interval_s` it reads, for each worker slot:
    GPU slot  -> NVML: memory used / total, utilisation, temperature, power,
                 health (1 answers, 0 NVML fails for it). No CUDA context.
    CPU slot  -> psutil on the worker's pid: RSS / machine memory, CPU percent.
It writes only the monitor-owned columns. The NVML seam (`Nvml`) is replaced
by a fake in tests; a machine without a driver simply has no NVML.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from workers.wire.board import Col, StatusBoard

log = logging.getLogger("vibevoice_pool")


class Nvml(Protocol):
    def sample(self, index: int) -> dict: ...


# XIDs after which a GPU cannot be trusted until it is reset (NVIDIA's XID catalogue):
# 48 double-bit ECC, 63/64 row remapping, 74 NVLink, 79 fallen off the bus,
# 92 high single-bit ECC rate, 94/95 contained/uncontained ECC.
CRITICAL_XIDS = {48, 63, 64, 74, 79, 92, 94, 95}
XID_QUARANTINE_S = 30.0


class RealNvml:
    """NVML through nvidia-ml-py; `open()` returns None when there is no driver.
    Critical XID events mark a device unhealthy for XID_QUARANTINE_S."""

    def __init__(self, pynvml):
        self.nv = pynvml
        self._events = None
        self._xid_until: dict[int, float] = {}
        self._index_of: dict[str, int] = {}
        try:
            self._events = pynvml.nvmlEventSetCreate()
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                self._index_of[pynvml.nvmlDeviceGetUUID(h)] = i
                pynvml.nvmlDeviceRegisterEvents(
                    h, pynvml.nvmlEventTypeXidCriticalError, self._events
                )
        except pynvml.NVMLError as e:  # not supported on this driver or device
            log.info("NVML XID events are not available: %s", e)
            self._events = None

    def _poll_xids(self) -> None:
        nv = self.nv
        while self._events is not None:
            try:
                ev = nv.nvmlEventSetWait_v2(self._events, 0)
            except nv.NVMLError:  # NVML_ERROR_TIMEOUT: no event waiting
                return
            xid = int(ev.eventData)
            try:
                index = self._index_of.get(nv.nvmlDeviceGetUUID(ev.device), -1)
            except nv.NVMLError:
                index = -1
            log.error("GPU %s reported XID %d", index, xid)
            if xid in CRITICAL_XIDS and index >= 0:
                self._xid_until[index] = time.monotonic() + XID_QUARANTINE_S

    @classmethod
    def open(cls) -> RealNvml | None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # ImportError or NVMLError (no driver): no NVML here
            return None
        return cls(pynvml)

    def sample(self, index: int) -> dict:
        nv = self.nv
        self._poll_xids()
        if self._xid_until.get(index, 0.0) > time.monotonic():
            return {"healthy": False, "reason": "critical XID error"}
        h = nv.nvmlDeviceGetHandleByIndex(index)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        out = {"mem_used": mem.used, "mem_total": mem.total}
        out["util"] = nv.nvmlDeviceGetUtilizationRates(h).gpu
        try:
            out["temp"] = nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
            out["power"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
        except nv.NVMLError:
            pass
        return out


class Monitor:
    def __init__(self, board: StatusBoard, slots, nvml: Nvml | None, interval_s: float = 1.0):
        """`slots()` returns [(row, cuda_index or None, pid or None)]."""
        self.board = board
        self.slots = slots
        self.nvml = nvml
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._procs: dict[int, object] = {}
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                self.sample_once()
            except Exception as e:  # no file handle left (EMFILE), say: sample again later
                if not failing:
                    log.warning("The device monitor could not sample (retrying): %s", e)
                failing = True
                continue
            if failing:
                log.info("The device monitor samples again")
            failing = False

    def sample_once(self) -> None:
        for row, cuda_index, pid in self.slots():
            if cuda_index is not None:
                self._gpu(row, cuda_index)
            else:
                self._cpu(row, pid)

    def _gpu(self, row: int, index: int) -> None:
        b = self.board
        if self.nvml is None:
            b.set(row, Col.HEALTH, -1)
            return
        try:
            s = self.nvml.sample(index)
        except Exception as e:  # an NVML failure for this device marks it unhealthy
            if b.get(row, Col.HEALTH) != 0:
                log.warning("GPU %d does not answer NVML: %s", index, e)
            b.set(row, Col.HEALTH, 0)
            return
        if not s.get("healthy", True):
            if b.get(row, Col.HEALTH) != 0:
                log.warning("GPU %d is unhealthy: %s", index, s.get("reason", "NVML says so"))
            b.set(row, Col.HEALTH, 0)
            return
        b.set(row, Col.MEM_USED, s.get("mem_used", 0))
        b.set(row, Col.MEM_TOTAL, s.get("mem_total", 0))
        b.set(row, Col.UTIL, s.get("util", 0))
        b.set(row, Col.TEMP, s.get("temp", 0))
        b.set(row, Col.POWER, s.get("power", 0))
        b.set(row, Col.HEALTH, 1)

    def _cpu(self, row: int, pid: int | None) -> None:
        import psutil

        b = self.board
        if not pid:
            return
        proc = self._procs.get(row)
        try:
            if proc is None or proc.pid != pid:
                proc = psutil.Process(pid)
                proc.cpu_percent(None)  # the first call only starts the count
                self._procs[row] = proc
            b.set(row, Col.MEM_USED, proc.memory_info().rss)
            b.set(row, Col.MEM_TOTAL, psutil.virtual_memory().total)
            b.set(row, Col.UTIL, min(100.0, proc.cpu_percent(None)))
            b.set(row, Col.HEALTH, 1)
        except psutil.Error:
            self._procs.pop(row, None)
