"""VibeVoice-Large (microsoft's 7B, served from community mirrors such as
aoi-ot/VibeVoice-Large) through conversion and the step engine.

The Large is VibeVoice-1.5B's architecture around Qwen2.5-7B (docs/MODEL.md, "Checkpoints"):
28 layers, 28 query heads and 4 KV heads over hidden 3584 (head dim 128), intermediate
18944, an untied lm_head over 152,064 embedding rows (the tokenizer has 151,665), a
diffusion head of 4 layers at the LM's width, and the same acoustic (64) and semantic (128)
latents. Its original-layout weights come in ten shards, model-00001-of-00010.safetensors
to model-00010-of-00010.safetensors, named by model.safetensors.index.json.

The checkpoint built here has all of that but the widths: head dim 8 (hidden 224) and
small MLPs, which change no code path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_step_engine import assert_alone, drive, req, voice
from vibevoice_reference import Reference

from workers.checkpoints import convert, weight_names
from workers.checkpoints.tiny import tiny_config_dict

LARGE_TEXT = {  # the Large's decoder_config, but for the widths
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_size": 28 * 8,
    "intermediate_size": 96,
    "max_window_layers": 28,
    "max_position_embeddings": 32768,  # the 1.5B's is 65,536
}
LARGE_SHARDS = 10
LARGE_VOCAB_PAD = 399  # 152,064 embedding rows against the tokenizer's 151,665


def large_shape(vocab: int, ids: dict[str, int]) -> dict:
    """VibeVoiceConfig kwargs at the Large's head counts, layers and latent widths."""
    shape = tiny_config_dict(vocab, ids)
    text = shape["text_config"]
    text.update(LARGE_TEXT, vocab_size=vocab + LARGE_VOCAB_PAD, tie_word_embeddings=False)
    shape["audio_config"]["hidden_size"] = 64
    shape["semantic_model_config"]["hidden_size"] = 128
    shape["diffusion_head_config"].update(
        hidden_size=text["hidden_size"],
        latent_size=64,
        num_hidden_layers=4,
        intermediate_size=3 * text["hidden_size"],  # head_ffn_ratio 3.0
    )
    return shape


def make_large_original_checkpoint(folder: Path, tiny_dir: str, seed: int = 7) -> Path:
    """A Large-shaped checkpoint in the original layout, as the mirrors hold it: ten
    shards and their index, the original config.json (tie_word_embeddings false at the
    top, none in decoder_config) and preprocessor_config.json naming Qwen/Qwen2.5-7B.
    The tiny tokenizer is kept alongside (the real checkpoint has none)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, VibeVoiceConfig, VibeVoiceForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tiny = json.loads((Path(tiny_dir) / "config.json").read_text())
    ids = {k: tiny[f"{k}_token_id"] for k in ("pad", "eos", "audio_bos", "audio_eos", "audio")}
    shape = large_shape(len(tok), ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VibeVoiceForConditionalGeneration(VibeVoiceConfig(**shape)).eval()
    state = {
        weight_names.hf_to_original_key(k): v.contiguous() for k, v in model.state_dict().items()
    }
    assert "lm_head.weight" in state  # untied: the Large ships its own head

    folder.mkdir(parents=True)
    names = sorted(state)
    per = -(-len(names) // LARGE_SHARDS)
    weight_map = {}
    for i in range(LARGE_SHARDS):
        shard = f"model-{i + 1:05d}-of-{LARGE_SHARDS:05d}.safetensors"
        part = {k: state[k] for k in names[i * per : (i + 1) * per]}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    config = convert.original_config_from_tiny(shape)
    config["decoder_config"].pop("tie_word_embeddings")
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    preprocessor = {
        "processor_class": "VibeVoiceProcessor",
        "speech_tok_compress_ratio": 3200,
        "db_normalize": True,
        "audio_processor": {"sampling_rate": 24000, "normalize_audio": True},
        "language_model_pretrained_name": "Qwen/Qwen2.5-7B",
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_dir) / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def large_dirs(tiny_model_dir, tmp_path_factory):
    """(the original-layout folder, its conversion) for the whole module."""
    root = tmp_path_factory.mktemp("large")
    src = make_large_original_checkpoint(root / "original", tiny_model_dir)
    dst = Path(convert.convert_checkpoint(src, root / "hf"))
    return src, dst


@pytest.fixture(scope="module")
def served(large_dirs):
    """The converted Large with the tiny model's sequence_bias on the audio token:
    random weights need it to speak at all (workers/checkpoints/tiny.py)."""
    _, dst = large_dirs
    gen = dst / "generation_config.json"
    conf = json.loads(gen.read_text())
    conf["sequence_bias"] = [
        [[json.loads((dst / "config.json").read_text())["audio_token_id"]], 50.0]
    ]
    gen.write_text(json.dumps(conf))
    return dst


def test_a_large_checkpoint_in_ten_shards_converts_weight_for_weight(large_dirs):
    from safetensors.torch import load_file
    from transformers import VibeVoiceForConditionalGeneration

    src, dst = large_dirs
    assert convert.looks_like_original_layout(src)
    original = {}
    for shard in sorted(src.glob("model-*-of-00010.safetensors")):
        original.update(load_file(str(shard)))
    model = VibeVoiceForConditionalGeneration.from_pretrained(dst)
    text = model.config.text_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        28,
        28,
        4,
    )
    assert not model.config.tie_word_embeddings
    converted = model.state_dict()
    assert len(converted) == len(original)
    for key, tensor in original.items():
        assert torch.equal(converted[weight_names.original_to_hf_key(key)], tensor), key
    # the head is the Large's own, not the embeddings
    assert not torch.equal(
        converted["lm_head.weight"], converted["model.language_model.embed_tokens.weight"]
    )
    tok = json.loads((dst / "tokenizer.json").read_text())
    words = len(tok["model"]["vocab"]) + len(tok["added_tokens"])
    assert model.config.vocab_size == words + LARGE_VOCAB_PAD


@pytest.fixture(scope="module", params=["eager", "graphs", "graphs-lm"])
def large_engine(served, request):
    """The engine on the converted Large in each engine mode (on CPU the bucketed code a
    CUDA graph would capture runs as plain calls)."""
    from workers.engines.contract import EngineSpec
    from workers.engines.vibevoice.engine import VibeVoiceEngine

    spec = EngineSpec(
        engine="vibevoice", model_path=str(served), max_batch_size=4, engine_mode=request.param
    )
    eng = VibeVoiceEngine(spec)
    eng.load()
    assert (eng.steps.lm_graphs is not None) == (request.param == "graphs-lm")
    return eng


def test_the_engine_on_the_converted_large_equals_transformers_generate(large_engine, served):
    reference = Reference(str(served))
    # served as real weights (no tiny-model marker): a row ends at its max_audio_s
    rows = [
        req("plain", seed=1, max_audio_s=1.2),
        req("voiced", "Short one.", seed=2, voices=(voice(),), max_audio_s=0.8),
    ]
    for r in rows:
        sink = drive(large_engine, {0: [r]})
        assert sink.ends[r.id] == "max_audio"
        assert len(sink.pcm(r.id)) == int(r.max_audio_s * 24000) // 3200 * 3200
        assert_alone(reference, sink, r)
    sink = drive(large_engine, {0: [rows[0]], 2: [rows[1]]})  # batched, joining 2 steps in
    for r in rows:
        assert_alone(reference, sink, r)


def test_the_engine_sizes_the_large_kv_by_its_kv_heads(large_engine):
    steps = large_engine.steps
    # layers x KV heads x head dim x (key, value) x 4 bytes (float32 here)
    assert steps.kv_bytes_per_token == 28 * 4 * 8 * 2 * 4
    assert (steps.kv.layers, steps.kv.kv_heads, steps.kv.head_dim) == (28, 4, 8)


LARGE_CONFIG = Path(__file__).parent / "data" / "vibevoice-large-config.json"
QWEN_IDS = {"pad": 151643, "eos": 151643, "audio_bos": 151652, "audio_eos": 151653, "audio": 151654}


def test_the_large_config_converts_to_its_9_34b_parameters_and_56_kib_of_kv_a_token():
    """The Large's config.json (tests/data, as a public port of microsoft's code keeps it
    for its default), converted and built on the meta device: the 9.34 B parameters
    published for the checkpoint, 18.7 GB (17.4 GiB) in bf16 as the mirrors' files, and
    a token's KV in one branch of 28 layers x 4 KV heads x 128 x (key, value) x 2 bytes."""
    from transformers import VibeVoiceConfig, VibeVoiceForConditionalGeneration

    original = json.loads(LARGE_CONFIG.read_text())
    assert convert.config_is_original_layout(original)
    config = VibeVoiceConfig(**convert.hf_config_from_original(original, QWEN_IDS))
    assert not config.tie_word_embeddings
    with torch.device("meta"):
        model = VibeVoiceForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())
    assert params == 9_343_355_363
    assert round(params * 2 / 2**30, 1) == 17.4
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert text.num_hidden_layers * text.num_key_value_heads * head_dim * 2 * 2 == 56 * 1024


@pytest.mark.parametrize("preprocessor", [None, {"language_model_pretrained_name": None}])
def test_a_large_without_a_named_tokenizer_converts_with_qwen2_5_7b(
    tmp_path, monkeypatch, preprocessor
):
    """A Large folder whose preprocessor_config.json is missing or names no tokenizer:
    conversion asks for the Large's own Qwen2.5-7B tokenizer (its vocabulary is the
    1.5B's), not Qwen2.5-1.5B's. The download is refused here; the name is what it asked."""
    import transformers

    asked = []

    def offline(name, *args, **kwargs):
        asked.append(name)
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    src = tmp_path / "large"
    src.mkdir()
    shutil.copy(LARGE_CONFIG, src / "config.json")
    if preprocessor is not None:
        (src / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    with pytest.raises(OSError, match="offline"):
        convert.convert_checkpoint(src, tmp_path / "hf")
    assert asked == ["Qwen/Qwen2.5-7B"]
    # a named tokenizer still wins, and the 1.5B's width still gets the 1.5B's
    (src / "preprocessor_config.json").write_text(
        json.dumps({"language_model_pretrained_name": "some/tokenizer"})
    )
    with pytest.raises(OSError):
        convert.convert_checkpoint(src, tmp_path / "hf")
    small = json.loads(LARGE_CONFIG.read_text())
    small["decoder_config"]["hidden_size"] = 1536
    (src / "config.json").write_text(json.dumps(small))
    (src / "preprocessor_config.json").unlink()
    with pytest.raises(OSError):
        convert.convert_checkpoint(src, tmp_path / "hf")
    assert asked == ["Qwen/Qwen2.5-7B", "some/tokenizer", "Qwen/Qwen2.5-1.5B"]


def test_the_large_config_fits_two_workers_and_their_rows_on_an_80_gb_gpu():
    """configs/vibevoice-large.yaml against the Large's shape: per worker the weights
    (17.4 GiB) and its KV budget, on an H100 80GB (81,559 MiB), leave at least 10 GiB
    for CUDA state and activations; the budget holds max_batch_size rows of 10 minutes
    (4,500 audio tokens after a 2,300-token prompt), counted as admission counts them
    (both branches, whole 256-token blocks of the Large's KV: flash-attn's, which round
    up most; sdpa's are 16 tokens)."""
    from vibevoice_pool import config as pool_config
    from workers.engines.vibevoice.paged_kv import PagedKV, blocks_for

    cfg = pool_config.build(pool_config.load_file(ROOT / "configs" / "vibevoice-large.yaml"))
    kv = PagedKV(28, 4, 128, torch.bfloat16, "meta", block_tokens=256)
    assert kv.bytes_per_block() == 256 * 56 * 1024
    prompt, steps = 2300, 4500
    row = blocks_for(prompt + steps + 2, 256) + blocks_for(steps + 2, 256)
    budget = cfg.mem_budget_mb * 2**20
    assert cfg.max_batch_size * row * kv.bytes_per_block() <= budget
    # 30 minutes (the default max_audio_s) after a 6,300-token prompt: 8 rows at once
    long = blocks_for(6300 + 13500 + 2, 256) + blocks_for(13500 + 2, 256)
    assert budget // (long * kv.bytes_per_block()) == 8
    # the longest row: both branches stopped by the 32,768 positions of the context
    most = blocks_for(32768 + 2, 256) + blocks_for(32768 + 2, 256)
    assert most * kv.bytes_per_block() < 3.6 * 2**30
    weights = 9_343_355_363 * 2
    left = 81_559 * 2**20 - cfg.workers_per_gpu * (weights + budget)
    assert left >= 10 * 2**30, left / 2**30


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_run_serves_a_checkpoint_with_the_config_file_config_names():
    """`make run MODEL=... CONFIG=configs/vibevoice-large.yaml` launches with the Large's
    settings (it always took configs/vibevoice-1.5b.yaml); without CONFIG, the 1.5B's."""
    import subprocess

    def launch(*args: str) -> str:
        out = subprocess.run(
            ["make", "-n", "-C", str(ROOT), "run", *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return next(line for line in out.splitlines() if " launch " in line)

    large = launch("MODEL=/models/large-hf", "CONFIG=configs/vibevoice-large.yaml")
    assert '--config "configs/vibevoice-large.yaml" --model_path "/models/large-hf"' in large
    assert '--config "configs/vibevoice-1.5b.yaml"' in launch("MODEL=/models/small-hf")


def test_the_gpu_benchmark_builds_the_large_shape_that_the_conversion_makes():
    """bench/bench_gpu_1p5b.py --model large (and gpu_all.py --model large, which passes it
    on) builds VibeVoice-Large's architecture: built on the meta device here, every weight
    has the name and shape the Large's own config.json converts to."""
    import argparse

    from transformers import VibeVoiceConfig, VibeVoiceForConditionalGeneration

    from bench import bench_gpu_1p5b

    args = argparse.Namespace(tiny=False, device="meta", model="large")
    bench = bench_gpu_1p5b.build_model(args, torch)
    config = VibeVoiceConfig(
        **convert.hf_config_from_original(json.loads(LARGE_CONFIG.read_text()), QWEN_IDS)
    )
    with torch.device("meta"):
        converted = VibeVoiceForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in converted.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in bench.state_dict().items()} == shapes
    assert sum(p.numel() for p in bench.parameters()) == 9_343_355_363
    assert bench.dtype == torch.bfloat16 and not bench.config.tie_word_embeddings


def test_a_large_in_the_original_layout_is_refused_without_pointing_at_the_1_5b(large_dirs):
    """The refusal a worker boots with gives the command that converts the folder; it
    offered `vibevoice/VibeVoice-1.5B-hf` as "the converted checkpoint" to anyone, a Large's
    owner included, who would be served another, smaller model."""
    src, _ = large_dirs
    message = convert.refusal_for(str(src))
    assert f"vibevoice-pool convert {src} DST" in message
    assert "or use the converted checkpoint" not in message
    assert "VibeVoice-1.5B also comes converted (vibevoice/VibeVoice-1.5B-hf)" in message
    assert "the Large does not" in message


def test_a_large_row_is_capped_at_its_32768_positions(large_engine):
    """The Large's context is half the 1.5B's: a 90-minute request (40,500 audio tokens)
    is cut where prompt and audio tokens fill 32,768 positions, stop reason "context",
    which is also what admission counts for it."""
    from workers.wire.messages import StopReason

    r = req("long", max_audio_s=5400.0, est_audio_s=5400.0)
    cap = large_engine._caps(r, prompt_tokens=300)
    assert (cap.steps, cap.step_reason) == (32768 - 300, StopReason.CONTEXT.value)
    assert cap.tokens == 40500
