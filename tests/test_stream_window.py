"""The window a resumed row reruns to rebuild its stream caches (receptive.py): read
from the modules, it is what an impulse through the real stacks reaches, for the tiny
model's tower and for VibeVoice-1.5B's (at one filter: a lookback depends on kernels,
strides and depths, not widths); and the engine takes it from the model it loaded."""

from __future__ import annotations

import pytest

from bench.stream_window import build, impulse_lookback, towers
from workers.engines.vibevoice.receptive import lookback_frames


@pytest.mark.parametrize("name", ["tiny", "VibeVoice-1.5B"])
def test_the_window_read_from_the_modules_is_what_an_impulse_reaches(name):
    decoder, encoder = build(*towers(num_filters=1)[name])
    read = lookback_frames(decoder), lookback_frames(decoder, encoder)
    assert impulse_lookback(decoder, encoder, frames=read[1] + 8) == read
    # the semantic features reach back through both stacks: more than the decoder alone
    assert read[1] > read[0] > 0
    if name == "VibeVoice-1.5B":  # more than the 96 frames the engine once assumed
        assert read == (58, 116)


def test_an_impulse_that_runs_out_of_frames_says_so():
    decoder, encoder = build(*towers(num_filters=1)["tiny"])
    assert impulse_lookback(decoder, encoder, frames=10) == (None, None)


def test_the_engine_reruns_its_own_models_window(engine):
    m = engine.model.model
    want = lookback_frames(m.audio_tower.decoder, m.semantic_tokenizer_encoder)
    assert engine.steps.speech.stream_frames == want == 29  # the tiny model's tower


def test_a_stack_without_the_convs_it_reads_gives_no_window():
    import torch

    plain = torch.nn.Sequential(torch.nn.Conv1d(1, 1, 3))
    decoder, _ = build(*towers(num_filters=1)["tiny"])
    assert lookback_frames(plain) is None
    assert lookback_frames(decoder, plain) is None  # then a resume reruns every frame
