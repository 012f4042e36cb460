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
from workers.host.step_host import StepHost
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

    @staticmethod
    def demo(script):
        """What both demos (gradio_demo.py, inference_from_file.py) do to a script before
        the processor sees it."""
        return script.replace("\u2019", "'")

    def __call__(self, script, voice_samples=None):
        parsed = self.parse(self.demo(script))
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
    "typographic apostrophes": (
        "Speaker 1: Don\u2019t stop, it\u2019s fine.\nSpeaker 2: We\u2019ll see.",
        [V0, V1],
        (V0, V1),
    ),
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
    host = StepHost(eng, sink)
    host.submit(longer)
    for _ in range(3):
        host.run_step()
    host.submit(mine)
    while not host.idle:
        host.run_step()
    joined = sink.audio("me")
    assert len(joined) == len(alone)
    assert np.abs(joined - alone).max() < 1e-3 * np.abs(alone).max()


# ---- numerics: the token choice in float32 --------------------------------------------


@pytest.fixture(scope="module")
def bf16_engine(tiny_model_dir):
    eng = VibeVoiceEngine(
        EngineSpec(engine="vibevoice", model_path=tiny_model_dir, dtype="bfloat16")
    )
    eng.load()
    return eng


def bf16_choice(steps, hidden: torch.Tensor) -> int:
    """What the engine chose before: the full lm_head in the model's dtype, cast to
    float32 after, plus the four-token constraint and the sequence_bias."""
    logits = steps.model.lm_head(hidden).float()
    bias = torch.full_like(logits, float("-inf"))
    bias[:, steps.allowed] = steps.head_bias
    return int((logits + bias).argmax(dim=-1)[0])


def near_tie(steps, gap: float) -> torch.Tensor:
    """A bf16 hidden state whose float32 scores put the audio token `gap` above EOS and
    the two others far below (least-norm solve over the four lm_head rows)."""
    ids = steps.allowed.tolist()
    cfg = steps.model.config
    target = torch.full((4,), -100.0)
    audio, eos = ids.index(cfg.audio_token_id), ids.index(cfg.eos_token_id)
    target[eos] = 40.0
    target[audio] = 40.0 + gap
    target = target - steps.head_bias  # the scores include the sequence_bias
    hidden = torch.linalg.pinv(steps.head_weight) @ target
    return hidden[None].to(torch.bfloat16)


def test_the_token_is_chosen_from_float32_logits_of_the_four_allowed_tokens(bf16_engine):
    """On a near-tie between the audio token and EOS, logits computed in bf16 (then cast)
    choose EOS, float32 logits choose audio, and the engine follows float32."""
    steps = bf16_engine.steps
    cfg = steps.model.config
    assert steps.model.dtype == torch.bfloat16
    assert steps.head_weight.dtype == torch.float32 and steps.head_weight.shape[0] == 4
    assert sorted(steps.allowed.tolist()) == steps.allowed.tolist()
    flipped = []
    for k in range(1, 40):
        hidden = near_tie(steps, gap=0.005 * k)
        scores = steps.allowed_logits(hidden)[0]
        assert scores.dtype == torch.float32
        fp32 = int(steps.allowed[scores.argmax()])
        if fp32 == cfg.audio_token_id and bf16_choice(steps, hidden) == cfg.eos_token_id:
            flipped.append(hidden)
    assert flipped, "no near-tie flipped between bf16 and float32"
    for hidden in flipped:
        assert int(steps._choose(hidden)[0]) == cfg.audio_token_id
    # far from a tie, both agree: the slice is the same head
    for gap in (-5.0, 5.0):
        hidden = near_tie(steps, gap)
        assert int(steps._choose(hidden)[0]) == bf16_choice(steps, hidden)


def test_flash_attention_is_taken_where_installed_and_sdpa_otherwise(monkeypatch, caplog):
    import importlib.util

    from workers.engines.vibevoice.engine import attention_for

    assert attention_for("eager", "cuda:0") == ("eager", "as configured")
    assert attention_for("auto", "cpu")[0] == "sdpa"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real(n, *a)
    )
    with caplog.at_level("INFO", logger="vibevoice_pool.worker"):
        assert attention_for("flash_attention_2", "cuda:0")[0] == "sdpa"
    assert "flash-attn package is not installed" in caplog.text
    assert "sdpa may lower audio quality" in caplog.text
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a)
    )
    assert attention_for("auto", "cuda:0")[0] == "flash_attention_2"


# ---- the length estimate knows the script ----------------------------------------------

EN_DIALOGUE = (  # 50 words: about 20 s at 150 words a minute
    "Did you finish the report for tomorrow's meeting?\n"
    "Almost. I still need the sales figures from March, and a chart or two.\n"
    "I can send those tonight. Do you want the regional numbers as well?\n"
    "Yes, please. The board will ask about the north first, so put that on top."
)
ZH_DIALOGUE = (  # 76 Han characters: about 17 s at 4-5 characters a second
    "你今天下午有空吗？我们一起去看电影吧。\n"
    "好啊，不过我要先把工作做完，大概五点以后才能出门。\n"
    "没关系，我们可以看七点那场，看完再去吃晚饭。\n"
    "太好了，那就这么定了，我到时候给你打电话。"
)


def test_the_estimate_counts_each_script_at_its_own_rate():
    from workers.wire import estimate as e

    assert len(EN_DIALOGUE.split()) == 50
    assert sum(0x4E00 <= ord(c) <= 0x9FFF for c in ZH_DIALOGUE) == 76
    for text, natural in ((EN_DIALOGUE, 50 / 2.5), (ZH_DIALOGUE, 76 / 4.5)):
        assert 0.7 * natural <= e.audio_seconds_for(text) <= 1.3 * natural
    # each kind at its rate: 9 Han characters, 9 words, 9 digits, 9 kana
    assert e.speech_seconds("今天天气很好我们走") == pytest.approx(9 / e.CJK_CHARS_PER_S)
    assert e.speech_seconds("one two three four five six seven eight nine") == pytest.approx(
        9 / e.WORDS_PER_S
    )
    assert e.speech_seconds("123456789") == pytest.approx(9 / e.DIGITS_PER_S)
    assert e.speech_seconds("ありがとうございま") == pytest.approx(9 / e.KANA_PER_S)
    # half-width katakana is kana (it was read as the letters of words: 1.6-1.8x short), and a
    # voicing mark, half-width or combining, belongs to the kana before it
    for half, full in (("ｺﾝﾆﾁﾊ", "コンニチハ"), ("ｹﾞﾝｷﾃﾞｽｶ", "ゲンキデスカ")):
        assert e.speech_seconds(half) == pytest.approx(e.speech_seconds(full))
    assert e.speech_seconds("\u30ab\u3099") == pytest.approx(e.speech_seconds("\u30ac"))
    # a long word counts as several; punctuation adds its pause
    assert e.speech_seconds("Donaudampfschifffahrt") == pytest.approx(3 / e.WORDS_PER_S)
    assert e.speech_seconds("Yes. No, maybe") == pytest.approx(
        3 / e.WORDS_PER_S + e.SENTENCE_PAUSE_S + e.CLAUSE_PAUSE_S
    )
    assert e.audio_seconds_for("Hi") == e.MIN_AUDIO_S
    assert e.audio_seconds_for(ZH_DIALOGUE, max_audio_s=3.0) == 3.0


def test_a_chinese_script_gets_a_runaway_cap_of_at_least_twice_its_natural_length():
    """Even where its prompt is short in tokens (a Qwen-sized vocabulary packs a Han
    character or two in a token), the cap follows the estimate; and it is never tighter
    than microsoft's 2 x the prompt's tokens, voice placeholders included."""
    from workers.engines.vibevoice.engine import TOKENS_PER_S, row_cap
    from workers.wire.estimate import audio_seconds_for
    from workers.wire.messages import Request, Turn

    turns = tuple(Turn(k % 2, line) for k, line in enumerate(ZH_DIALOGUE.split("\n")))
    r = Request(id="zh", turns=turns, est_audio_s=audio_seconds_for(ZH_DIALOGUE))
    natural_tokens = 76 / 4.5 * TOKENS_PER_S
    for prompt in (60, 110, 400):
        cap = row_cap(r, prompt_tokens=prompt)
        assert cap.steps >= 2 * natural_tokens and cap.steps >= 2 * prompt
    # a short line is never cut before the floor
    hi = Request(id="hi", turns=(Turn(0, "Hi."),), est_audio_s=audio_seconds_for("Hi."))
    assert row_cap(hi, prompt_tokens=10, runaway_factor=0.5).steps >= 5 * TOKENS_PER_S
