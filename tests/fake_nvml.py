"""FakeNvml: the Monitor's NVML seam with devices a test sets by hand.

    nvml = FakeNvml({0: FakeGpu(mem_total=80 << 30), 1: FakeGpu(...)})
    nvml.gpus[1].lost = True          # every NVML call for GPU 1 now fails
    nvml.gpus[0].mem_used = 80 << 30  # GPU 0 is full

It also gives the `Gpu` list that `Pool.start(gpus=...)` takes, so a pool of
sim workers can be "placed" on fake GPUs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from vibevoice_pool.pool.devices import Gpu


class FakeNvmlError(RuntimeError):
    """What the fake raises for a lost device (the real one raises NVMLError)."""


@dataclass
class FakeGpu:
    name: str = "Fake GPU"
    mem_total: int = 80 << 30
    mem_used: int = 0
    util: float = 0.0
    temp: float = 40.0
    power: float = 100.0
    lost: bool = False  # NVML calls fail (fallen off the bus)
    healthy: bool = True  # NVML answers but reports a critical error


class FakeNvml:
    def __init__(self, gpus: dict[int, FakeGpu]):
        self.gpus = gpus
        self.calls = 0
        self._lock = threading.Lock()

    def gpu_list(self) -> list[Gpu]:
        return [Gpu(i, g.name, g.mem_total) for i, g in sorted(self.gpus.items())]

    def sample(self, index: int) -> dict:
        with self._lock:
            self.calls += 1
            g = self.gpus[index]
            if g.lost:
                raise FakeNvmlError(f"GPU {index} is lost")
            if not g.healthy:
                return {"healthy": False, "reason": "fake critical error"}
            return {
                "mem_used": g.mem_used,
                "mem_total": g.mem_total,
                "util": g.util,
                "temp": g.temp,
                "power": g.power,
            }
