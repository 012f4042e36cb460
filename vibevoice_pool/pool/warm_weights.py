"""Weights kept warm on the host: a model folder whose weight files live in memory.

    held = WarmWeights.hold(model_folder)    once, in the parent, at launch
                                             (WeightsHolder: one per model folder)
    held.path                                the folder workers load from
    held.close()                             at shutdown (or the parent's death)

`hold` copies each `*.safetensors` file of a local model folder once into an
anonymous shared-memory file (`memfd_create`) that the parent keeps open, and
builds a folder of links: each weight file points to its memory file
(`/proc/<parent pid>/fd/<n>`), every other file to the original. A worker
loading from that folder has safetensors map the weights straight from memory:
no disk read, and memory that the kernel cannot drop the way it drops page
cache (it may swap it). Every worker maps the same pages, so N CPU workers hold
one copy. Nothing leaks: the memory goes with the parent's last descriptor,
even after SIGKILL; only the folder of links stays, and the next launch removes
the ones whose parent is gone.

A hub id (not a local folder) is loaded by each worker as before.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from workers.checkpoints.convert import refusal_for

log = logging.getLogger("vibevoice_pool")

PREFIX = "vibevoice-pool-weights-"
WEIGHT_SUFFIX = ".safetensors"
COPY_CHUNK = 64 << 20


def _links_root() -> str:
    """Where the folder of links goes: /dev/shm when there is one (it is memory too)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else ""


def _sweep(root: str) -> None:
    """Remove folders of links whose parent process is gone (a parent SIGKILLed)."""
    base = Path(root or tempfile.gettempdir())
    for folder in base.glob(PREFIX + "*"):
        try:
            pid = int(folder.name[len(PREFIX) :].split("-")[0])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # another user's: alive


class WarmWeights:
    def __init__(self, source: Path, folder: Path, path: Path, fds: list[int], nbytes: int, s):
        self.source = source
        self.folder = folder  # removed at close
        self.path = str(path)  # what workers load (named as the source folder)
        self.fds = fds
        self.nbytes = nbytes
        self.copy_s = s

    @classmethod
    def hold(cls, model_path: str) -> WarmWeights | None:
        """Hold a local model folder's weights in memory; None when there is nothing
        to hold (a hub id, no weight file) or this system cannot (no memfd)."""
        source = Path(model_path)
        if not source.is_dir() or not hasattr(os, "memfd_create"):
            return None
        weights = sorted(p for p in source.iterdir() if p.name.endswith(WEIGHT_SUFFIX))
        if not weights or not (source / "config.json").is_file() or refusal_for(model_path):
            return None  # the worker reports what is wrong, naming the folder given
        size = sum(p.stat().st_size for p in weights)
        if size > _available_bytes() / 2:
            log.info("Weights (%.0f MB) not held in memory: too little free memory", size / 1e6)
            return None
        root = _links_root()
        _sweep(root)
        t0 = time.monotonic()
        folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root or None))
        path = folder / source.name
        path.mkdir()
        fds: list[int] = []
        nbytes = 0
        try:
            for entry in source.iterdir():
                if entry.name.endswith(WEIGHT_SUFFIX):
                    fd = _memory_copy(entry)
                    fds.append(fd)
                    nbytes += os.fstat(fd).st_size
                    target = f"/proc/{os.getpid()}/fd/{fd}"
                else:
                    target = str(entry.resolve())
                (path / entry.name).symlink_to(target)
        except OSError as e:
            for fd in fds:
                os.close(fd)
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("Weights not held in memory (%s); workers read %s", e, source)
            return None
        held = cls(source, folder, path, fds, nbytes, time.monotonic() - t0)
        log.info(
            "🔥 %.0f MB of weights held in memory in %.1f s: workers map them from there",
            nbytes / 1e6,
            held.copy_s,
        )
        return held

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        shutil.rmtree(self.folder, ignore_errors=True)


class WeightsHolder:
    """The supervisor's weights in memory: one WarmWeights per model folder, made
    when the first worker of that folder starts, closed at shutdown."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.held: dict[str, WarmWeights | None] = {}

    def spec_for(self, engine):
        """The EngineSpec a worker gets: its model folder swapped for the one whose
        weights are in memory, when they are."""
        if engine.engine != "vibevoice" or not self.enabled or not engine.model_path:
            return engine
        if engine.model_path not in self.held:
            self.held[engine.model_path] = WarmWeights.hold(engine.model_path)
        held = self.held[engine.model_path]
        return engine if held is None else replace(engine, model_path=held.path)

    def close(self) -> None:
        for held in self.held.values():
            if held is not None:
                held.close()
        self.held = {}


def _available_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


def _memory_copy(src: Path) -> int:
    """An anonymous memory file holding src's bytes (the descriptor is inheritable
    by nobody: workers reach it through /proc)."""
    fd = os.memfd_create(src.name, os.MFD_CLOEXEC)
    try:
        with open(src, "rb") as f:
            while chunk := f.read(COPY_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd
