"""Fidelity to microsoft/VibeVoice: prompts token for token, and a row's audio its own.

The reference below is written from microsoft's processor
(`vibevoice/processor/vibevoice_processor.py`: `_parse_script`, `_process_single`,
`_create_voice_prompt`, `AudioNormalizer`): a script string and a positional list of
voice samples in, ids out. It shares no code with the engine's prompt builder. The
engine's side is what `VibeVoiceEngine`'s prefill really embeds.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_vibevoice_engine import RecordingSink, req, run

from workers.engines.contract import EngineSpec
from workers.engines.vibevoice.engine import VibeVoiceEngine
from workers.wire.messages import SAMPLE_RATE

SYSTEM = (
    " Transform the text provided by various speakers into speech output, utilizing the "
    "distinct voice of each respective speaker.\n"
)


class ReferenceProcessor:
    """microsoft's prompt format, as its processor builds it."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.speech_start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
        self.speech_end = tokenizer.convert_tokens_to_ids("<|vision_end|>")
        self.speech_diffusion = tokenizer.convert_tokens_to_ids("<|vision_pad|>")

    def enc(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    @staticmethod
    def parse(script):
        lines = []
        for line in script.strip().split("\n"):
            if not line.strip():
                continue
            mt = re.match(r"^Speaker\s+(\d+)\s*:\s*(.*)$", line.strip(), re.IGNORECASE)
            lines.append((int(mt.group(1)), " " + mt.group(2).strip()))
        if min(s for s, _ in lines) > 0:
            lines = [(s - 1, t) for s, t in lines]
        return lines

    @staticmethod
    def normalise(wav, target_db=-25.0, eps=1e-6):
        wav = np.asarray(wav, dtype=np.float32)
        rms = np.sqrt(np.mean(wav**2))
        wav = wav * (10 ** (target_db / 20) / (rms + eps))
        peak = np.max(np.abs(wav))
        return wav / (peak + eps) if peak > 1.0 else wav

    def __call__(self, script, voice_samples=None):
        parsed = self.parse(script)
        speakers = set(s for s, _ in parsed)
        ids = self.enc(SYSTEM)
        wavs = []
        if voice_samples:
            ids += self.enc(" Voice input:\n")
            for sid, audio in enumerate(voice_samples[: len(speakers)]):
                wav = self.normalise(audio)
                wavs.append(wav)
                n = math.ceil(wav.shape[0] / 3200)
                ids += self.enc(f" Speaker {sid}:")
                ids += [self.speech_start] + [self.speech_diffusion] * n + [self.speech_end]
                ids += self.enc("\n")
        ids += self.enc(" Text input:\n")
        for sid, text in parsed:
            ids += self.enc(f" Speaker {sid}:{text}\n")
        ids += self.enc(" Speech output:\n") + [self.speech_start]
        return ids, wavs


def voice(seconds, freq, seed=0):
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.RandomState(seed)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.randn(len(t))).astype(np.float32)


V0, V1 = voice(1.3, 180.0, 1), voice(0.7, 260.0, 2)
TWO = "Speaker 1: Hello there, how are you?\nSpeaker 2: Fine, thanks.\nSpeaker 1: Good."
CASES = {  # name: (script, microsoft's voice_samples, the request's voices)
    "two voiced speakers": (TWO, [V0, V1], (V0, V1)),
    "one voiced speaker": ("Speaker 1: Only me, talking.", [V0], (V0,)),
    "second speaker without a sample": (TWO, [V0], (V0, None)),
    "nobody with a sample": (TWO, None, ()),
    "double spaces inside a turn": ("Speaker 1: Hello  there,   friend.  Bye.", [V0], (V0,)),
}


def engine_inputs(engine, requests, monkeypatch):
    """The prefill inputs the engine builds for `requests` (joining together) and runs:
    what `build_inputs` gave it, checked against the ids its prefill embedded."""
    import workers.engines.vibevoice.prompt as prompt

    built, embedded = [], []
    real_build, real_embed = prompt.build_inputs, engine.steps.embed

    def spy_build(*args, **kwargs):
        batch = real_build(*args, **kwargs)
        built.append({k: v.detach().clone() for k, v in batch.inputs.items()})
        return batch

    def spy_embed(ids):
        if ids.ndim == 2:  # a prefill (a step embeds one token per row)
            embedded.append(ids.clone())
        return real_embed(ids)

    monkeypatch.setattr(prompt, "build_inputs", spy_build)
    monkeypatch.setattr(engine.steps, "embed", spy_embed)
    sink = run(engine, requests)
    assert all(sink.outcome(r.id)[0] == "finish" for r in requests)
    assert len(built) == len(embedded) == 1  # one prefill for the rows joining together
    assert torch.equal(built[0]["input_ids"], embedded[0])
    return built[0]


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_ids_match_microsofts_processor(engine, case, monkeypatch):
    from vibevoice_pool.script import parse_script

    script, samples, voices = CASES[case]
    ref_ids, ref_wavs = ReferenceProcessor(engine.processor.tokenizer)(script, samples)
    request = req("p", *[(t.speaker, t.text) for t in parse_script(script)], voices=voices)
    seen = engine_inputs(engine, [request], monkeypatch)
    assert seen["input_ids"][0].tolist() == ref_ids
    assert seen["attention_mask"].all()
    if ref_wavs:
        values, mask = seen["input_values"][:, 0, :], seen["padding_mask"]
        assert values.shape[0] == len(ref_wavs)
        for k, wav in enumerate(ref_wavs):
            assert int(mask[k].sum()) == len(wav)
            np.testing.assert_allclose(values[k, : len(wav)].numpy(), wav, atol=1e-6)
    else:
        assert "input_values" not in seen  # no voice section, no made-up voice


def test_a_batch_is_padded_on_the_left_with_each_row_its_own_prompt(engine, monkeypatch):
    ref = ReferenceProcessor(engine.processor.tokenizer)
    short = req("s", (0, "Hi."), voices=(V1,))
    long = req("l", (0, "A much longer first line for this row."), (1, "More."), voices=(V0, V1))
    seen = engine_inputs(engine, [short, long], monkeypatch)
    ids, mask = seen["input_ids"], seen["attention_mask"]
    want_short, _ = ref("Speaker 1: Hi.", [V1])
    want_long, _ = ref(
        "Speaker 1: A much longer first line for this row.\nSpeaker 2: More.", [V0, V1]
    )
    pad = ids.shape[1] - len(want_short)
    assert pad > 0 and ids[0, pad:].tolist() == want_short and ids[1].tolist() == want_long
    assert mask[0, :pad].sum() == 0 and mask[0, pad:].all() and mask[1].all()


def right_padded_copy(src: str, dst: Path) -> str:
    """The checkpoint with its tokenizer saved as padding on the right (as a hub or a
    converted checkpoint may load)."""
    shutil.copytree(src, dst)
    path = dst / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["padding_side"] = "right"
    path.write_text(json.dumps(config))
    return str(dst)


@pytest.mark.parametrize("side", ["right", "left"])
def test_same_audio_alone_batched_and_joining_whatever_side_the_checkpoint_pads(
    tiny_model_dir, tmp_path, side
):
    """ "right": the checkpoint's tokenizer is saved padding right; "left": the tiny model
    as it is built."""
    path = right_padded_copy(tiny_model_dir, tmp_path / "right") if side == "right" else None
    eng = VibeVoiceEngine(
        EngineSpec(engine="vibevoice", model_path=path or tiny_model_dir, max_batch_size=2)
    )
    eng.load()
    assert eng.processor.tokenizer.padding_side == side  # what the checkpoint says
    mine = req("me", (0, "Short line."), seed=7, est_audio_s=1.2, voices=(V1,))
    longer = req(
        "long",
        (0, "A much longer script than the other row, so that row is padded."),
        (1, "And a second voice too."),
        seed=8,
        est_audio_s=2.0,
        voices=(V0, V1),
    )
    alone = run(eng, [mine]).audio("me")
    for batch in ([longer, mine], [mine, longer]):  # joining together, either order
        batched = run(eng, batch).audio("me")
        assert len(batched) == len(alone)
        assert np.abs(batched - alone).max() < 1e-3 * np.abs(alone).max()
    # joining a running batch: the longer row is 3 steps in when this one arrives
    sink = RecordingSink()
    eng.admit(eng.prepare(longer))
    for _ in range(3):
        eng.step(sink)
    eng.admit(eng.prepare(mine))
    while eng.live:
        eng.step(sink)
    joined = sink.audio("me")
    assert len(joined) == len(alone)
    assert np.abs(joined - alone).max() < 1e-3 * np.abs(alone).max()
