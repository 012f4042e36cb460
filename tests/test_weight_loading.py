"""How a worker loads its weights: straight onto its device through a device map of
that one device, or through host memory (workers/engines/vibevoice/engine.py
load_weights), on the tiny random model."""

from __future__ import annotations

import torch


def test_weights_load_straight_onto_the_device_as_they_do_through_the_host(
    tiny_model_dir, monkeypatch, caplog
):
    """A GPU worker loaded every weight into host memory first and then moved the
    model (VibeVoice-Large: 18.7 GB of host memory a worker, N workers at once). It
    now loads through a device map of its one device, each weight from the file to
    the device. The same loader with the CPU as that device gives every parameter
    and buffer of the host path, bit for bit, and its device map says so."""
    from transformers import VibeVoiceForConditionalGeneration

    from workers.engines.vibevoice.engine import direct_load, load_weights

    assert direct_load("cuda:0") and not direct_load("cpu")  # accelerate is installed
    asked, load = [], VibeVoiceForConditionalGeneration.from_pretrained

    def spy(path, **kwargs):
        asked.append(kwargs.get("device_map"))
        return load(path, **kwargs)

    monkeypatch.setattr(VibeVoiceForConditionalGeneration, "from_pretrained", spy)
    args = (VibeVoiceForConditionalGeneration, tiny_model_dir, torch.float32, "sdpa")
    via_host = load_weights(*args)
    direct = load_weights(*args, "cpu")
    assert asked == [None, {"": "cpu"}]  # one load each: the device map's did not fall back
    mine, theirs = direct.state_dict(), via_host.state_dict()
    assert mine.keys() == theirs.keys() and len(mine) > 100
    for name, tensor in theirs.items():
        assert torch.equal(mine[name], tensor), name
    buffers = dict(via_host.named_buffers())
    assert buffers.keys() == dict(direct.named_buffers()).keys()
    # a device the weights cannot go to (no CUDA in this torch): the host path, said once
    with caplog.at_level("WARNING", logger="vibevoice_pool.worker"):
        fallback = load_weights(*args, "cuda:0")
    assert asked[-2:] == [{"": "cuda:0"}, None]
    assert all(t.device.type == "cpu" for t in fallback.state_dict().values())
    said = [r.getMessage() for r in caplog.records if "loading on the CPU first" in r.getMessage()]
    assert len(said) == 1, said
