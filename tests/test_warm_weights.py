"""Weights held in memory by the parent: what a worker loads from, and nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vibevoice_pool.pool import warm_weights
from vibevoice_pool.pool.warm_weights import PREFIX, WarmWeights, WeightsHolder
from workers.engines.contract import EngineSpec


def test_a_model_folder_is_mirrored_with_its_weights_in_memory(tiny_model_dir):
    source = Path(tiny_model_dir)
    held = WarmWeights.hold(tiny_model_dir)
    assert held is not None
    try:
        mirror = Path(held.path)
        assert mirror.name == source.name
        assert sorted(p.name for p in mirror.iterdir()) == sorted(p.name for p in source.iterdir())
        link = os.readlink(mirror / "model.safetensors")
        assert link.startswith(f"/proc/{os.getpid()}/fd/")  # a memory file, not the disk file
        assert (mirror / "model.safetensors").read_bytes() == (
            source / "model.safetensors"
        ).read_bytes()
        assert held.nbytes == (source / "model.safetensors").stat().st_size
        # another process (a worker) loads the weights through the link
        code = (
            "import sys; from safetensors.numpy import load_file; "
            "a = load_file(sys.argv[1]); b = load_file(sys.argv[2]); "
            "assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a); print(len(a))"
        )
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                str(mirror / "model.safetensors"),
                str(source / "model.safetensors"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert int(out.stdout) > 10
        fds = list(held.fds)
    finally:
        held.close()
    assert not held.folder.exists()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_nothing_is_held_for_a_hub_id_or_a_folder_without_weights(tmp_path):
    assert WarmWeights.hold("vibevoice/VibeVoice-1.5B-hf") is None
    (tmp_path / "config.json").write_text("{}")
    assert WarmWeights.hold(str(tmp_path)) is None
    holder = WeightsHolder(enabled=True)
    spec = EngineSpec(engine="vibevoice", model_path=str(tmp_path))
    assert holder.spec_for(spec) == spec
    assert holder.spec_for(EngineSpec(engine="sim")) == EngineSpec(engine="sim")


def test_the_holder_swaps_the_folder_once_and_can_be_turned_off(tiny_model_dir):
    spec = EngineSpec(engine="vibevoice", model_path=tiny_model_dir)
    assert WeightsHolder(enabled=False).spec_for(spec) == spec
    holder = WeightsHolder(enabled=True)
    try:
        a, b = holder.spec_for(spec), holder.spec_for(spec)
        assert a.model_path == b.model_path != tiny_model_dir
        assert len(holder.held) == 1
    finally:
        holder.close()
    assert not Path(a.model_path).exists()


def test_links_left_by_a_dead_parent_are_removed_at_the_next_hold(
    tiny_model_dir, tmp_path, monkeypatch
):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{PREFIX}{dead.pid}-abc"
    stale.mkdir()
    mine = tmp_path / f"{PREFIX}{os.getpid()}-xyz"
    mine.mkdir()
    monkeypatch.setattr(warm_weights, "_links_root", lambda: str(tmp_path))
    held = WarmWeights.hold(tiny_model_dir)
    try:
        assert not stale.exists() and mine.exists()
        assert held.folder.parent == tmp_path
    finally:
        held.close()
