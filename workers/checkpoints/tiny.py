"""The tiny VibeVoice: a real VibeVoice of a few million random weights, built offline.

This module owns building it: the model config at toy sizes, a byte-level BPE tokenizer
made with the `tokenizers` package, the chat template (our own, for VibeVoice's
conversation format), the processor, and a generation config whose `sequence_bias`
makes random weights emit audio tokens. It saves everything in the HF format, so
`VibeVoiceForConditionalGeneration.from_pretrained(dir)` and
`VibeVoiceProcessor.from_pretrained(dir)` load it like any converted checkpoint.
It makes noise, not speech: it exists so that tests and the demo run the real model
code on any machine. A file named TINY_MODEL marks the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_MARKER = "TINY_MODEL"
TINY_NOTE = "tiny random model: it makes noise, not speech"
TINY_VERSION = 2
DEFAULT_SEED = 1234

# Special tokens the processor and the model rely on (Qwen2's names for them).
EOS_TOKEN = "<|endoftext|>"
AUDIO_BOS = "<|vision_start|>"
AUDIO_EOS = "<|vision_end|>"
AUDIO_TOKEN = "<|vision_pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN)

HOP_SAMPLES = 3200  # samples per audio token: prod(downsampling_ratios)

# VibeVoice's conversation format: a system line, one voice slot per speaker that brings a
# sample, the script one line per turn, then the cue to start speaking. Messages are
# {"role": "<speaker id>", "content": [{"type": "text", ...}, {"type": "audio", ...}]}.
CHAT_TEMPLATE = (
    "{%- set bos = audio_bos_token | default('<|vision_start|>') -%}"
    "{%- set eos = audio_eos_token | default('<|vision_end|>') -%}"
    "{%- set pad = audio_token | default('<|vision_pad|>') -%}"
    "{%- set ns = namespace(voiced=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is not string -%}"
    "{%- set audios = message['content'] | selectattr('type', 'equalto', 'audio') | list -%}"
    "{%- if audios and message['role'] not in ns.voiced -%}"
    "{%- set ns.voiced = ns.voiced + [message['role']] -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- system_prompt | default(' Transform the text provided by various speakers into speech"
    " output, utilizing the distinct voice of each respective speaker.\\n') -}}"
    "{%- if ns.voiced -%}"
    "{{- ' Voice input:\\n' -}}"
    "{%- for speaker in ns.voiced -%}"
    "{{- ' Speaker ' ~ speaker ~ ':' ~ bos ~ pad ~ eos ~ '\\n' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- ' Text input:\\n' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{{- ' Speaker ' ~ message['role'] ~ ': ' ~ message['content'] ~ '\\n' -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}"
    "{{- ' Speaker ' ~ message['role'] ~ ': ' ~ item['text'] ~ '\\n' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- ' Speech output:\\n' ~ bos -}}"
)

# A little English so the BPE learns some merges; fixed, so the tokenizer is reproducible.
_CORPUS = (
    "Hello everyone, and welcome to the show. Today we talk about the weather, the news "
    "and the things that matter to you. Speaker one says hello; speaker two answers. "
    "Transform the text provided by various speakers into speech output, utilizing the "
    "distinct voice of each respective speaker. Voice input. Text input. Speech output. "
    "What do you think? I think that this is a good idea, and we should try it again. "
)


def _build_tokenizer():
    """A byte-level BPE (tokenizers) wrapped as Qwen2TokenizerFast, padding on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + 160,
        initial_alphabet=sorted(alphabet),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    # Re-create the model from sorted vocab and ordered merges (tuples), so the saved file is
    # identical from build to build whatever the trainer's internal ordering.
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = tok.pre_tokenizer
    bpe.decoder = tok.decoder
    bpe.add_special_tokens(list(SPECIAL_TOKENS))
    hf_tok = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        bos_token=None,
        padding_side="left",
        model_max_length=8192,
        extra_special_tokens={
            "audio_bos_token": AUDIO_BOS,
            "audio_eos_token": AUDIO_EOS,
            "audio_token": AUDIO_TOKEN,
        },
    )
    hf_tok.padding_side = "left"
    return hf_tok


def tiny_config_dict(vocab_size: int, token_ids: dict[str, int]) -> dict:
    """The VibeVoiceConfig kwargs of the tiny model: the smallest sizes that run."""
    ratios = [2, 2, 4, 5, 5, 8]  # hop 3200, the feature extractor's pad_to_multiple_of
    tower = {
        "hidden_size": 16,
        "num_filters": 4,
        "kernel_size": 7,
        "downsampling_ratios": ratios,
        "depths": [1] * (len(ratios) + 1),
        "initializer_range": 0.08,
    }
    return {
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 8192,
            "initializer_range": 0.08,
            "tie_word_embeddings": False,
            "pad_token_id": token_ids["pad"],
            "eos_token_id": token_ids["eos"],
        },
        "audio_config": {"model_type": "vibevoice_acoustic_tokenizer", **tower},
        "semantic_model_config": {
            "model_type": "vibevoice_acoustic_tokenizer_encoder",
            **tower,
            "hidden_size": 32,
        },
        "diffusion_head_config": {
            # transformers 5.17 checks these against the text width and the latent
            # size instead of copying them (5.23+ copies them): give them explicitly.
            "hidden_size": 64,
            "latent_size": tower["hidden_size"],
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "frequency_embedding_size": 256,  # fixed at 256 in the original layout
        },
        "pad_token_id": token_ids["pad"],
        "eos_token_id": token_ids["eos"],
        "audio_bos_token_id": token_ids["audio_bos"],
        "audio_eos_token_id": token_ids["audio_eos"],
        "audio_token_id": token_ids["audio"],
    }


def configure_generation(generation_config, audio_token_id: int, *, bias: bool) -> None:
    """Generation defaults we ship: DPM-Solver scheduler, 10 diffusion steps, greedy tokens.

    `bias` adds a sequence_bias on the audio token, which random weights need to emit audio
    at all (without it they never pick it and generate returns no audio).
    `_from_model_config = False` keeps these custom keys through a save/load round trip.
    """
    generation_config._from_model_config = False
    generation_config.do_sample = False
    generation_config.noise_scheduler_class = "DPMSolverMultistepScheduler"
    generation_config.noise_scheduler_config = {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
    }
    generation_config.num_diffusion_steps = 10
    generation_config.max_new_tokens = 256
    if bias:
        generation_config.sequence_bias = [[[audio_token_id], 50.0]]


def make_tiny_model(directory: str | os.PathLike, seed: int = DEFAULT_SEED) -> str:
    """Build the tiny random VibeVoice into `directory` (HF format) and return its path."""
    import torch
    from transformers import (
        VibeVoiceAcousticTokenizerFeatureExtractor,
        VibeVoiceConfig,
        VibeVoiceForConditionalGeneration,
        VibeVoiceProcessor,
    )

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    ids = {
        "eos": tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        "pad": tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        "audio_bos": tokenizer.convert_tokens_to_ids(AUDIO_BOS),
        "audio_eos": tokenizer.convert_tokens_to_ids(AUDIO_EOS),
        "audio": tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
    }
    config = VibeVoiceConfig(**tiny_config_dict(len(tokenizer), ids))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VibeVoiceForConditionalGeneration(config).eval()
    configure_generation(model.generation_config, ids["audio"], bias=True)
    model.generation_config.pad_token_id = ids["pad"]
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)

    feature_extractor = VibeVoiceAcousticTokenizerFeatureExtractor(
        sampling_rate=24000,
        normalize_audio=True,
        target_dB_FS=-25,
        eps=1e-6,
        pad_to_multiple_of=HOP_SAMPLES,
    )
    processor = VibeVoiceProcessor(
        feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    marker = {"version": TINY_VERSION, "seed": seed, "note": TINY_NOTE}
    (out / TINY_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return str(out)


def is_tiny_model(path: str | os.PathLike) -> bool:
    """True when `path` is a local folder built by make_tiny_model."""
    return (Path(path) / TINY_MARKER).is_file()


def ensure_tiny_model(cache_dir: str | os.PathLike, seed: int = DEFAULT_SEED) -> str:
    """Build the tiny model once into `cache_dir` and reuse it afterwards.

    Built into a private temporary folder and renamed into place, so two processes racing
    both end up with one complete copy (the loser drops its own).
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"vibevoice-tiny-v{TINY_VERSION}-seed{seed}"
    if is_tiny_model(final):
        return str(final)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=cache))
    try:
        make_tiny_model(tmp, seed=seed)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_tiny_model(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
