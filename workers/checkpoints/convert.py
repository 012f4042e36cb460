"""Original microsoft/VibeVoice checkpoints -> the HF layout transformers loads.

This module owns telling the two layouts apart (`looks_like_original_layout`, and the
refusal message the engine boots with), converting an original checkpoint's config and
weights into `VibeVoiceForConditionalGeneration`'s (`convert_checkpoint`), and, for tests,
writing a small original-layout checkpoint (`make_original_layout_checkpoint`).

The weights' names in the two layouts, one into the other: weight_names.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from workers.checkpoints.weight_names import hf_to_original_key, original_to_hf_key
from workers.wire.messages import ErrorKind, PoolError

CONVERT_HINT = "vibevoice-pool convert {src} DST"

# ---- detection --------------------------------------------------------------------------


def config_is_original_layout(config: dict) -> bool:
    """An original config nests `decoder_config`/`acoustic_tokenizer_config`; HF's has
    `text_config`/`audio_config`."""
    original = "decoder_config" in config or "acoustic_tokenizer_config" in config
    return original and "text_config" not in config


def _weight_names(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text()).get("weight_map", {}))
    names: list[str] = []
    for file in sorted(path.glob("*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(file), framework="np") as f:
            names.extend(f.keys())
    return names


def looks_like_original_layout(path: str | os.PathLike) -> bool:
    """True when the folder holds a checkpoint in the original microsoft/VibeVoice layout."""
    folder = Path(path)
    config = folder / "config.json"
    if config.is_file():
        try:
            return config_is_original_layout(json.loads(config.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    names = _weight_names(folder) if folder.is_dir() else []
    return any(n.startswith(("model.acoustic_tokenizer.", "model.prediction_head.")) for n in names)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # namespace/name, as the hub spells it


def refusal_for(model_path: str) -> str | None:
    """The message a worker boots with when `model_path` is in the original layout, else None."""
    folder = Path(model_path)
    if folder.is_dir():
        original = looks_like_original_layout(folder)
    elif folder.exists() or not HUB_ID.match(model_path):
        return None  # not a folder and not a hub id: from_pretrained reports it
    else:
        original = _hub_config_is_original(model_path)
    if not original:
        return None
    return (
        f"{model_path} is a checkpoint in the original microsoft/VibeVoice layout, which "
        "transformers' VibeVoiceForConditionalGeneration cannot load. Convert it once with "
        f"`{CONVERT_HINT.format(src=model_path)}` (DST: a new folder), then --model_path DST. "
        "VibeVoice-1.5B also comes converted (vibevoice/VibeVoice-1.5B-hf); the Large does not."
    )


def _hub_config_is_original(repo_id: str) -> bool:
    try:
        from huggingface_hub import hf_hub_download

        config = hf_hub_download(repo_id, "config.json")
        return config_is_original_layout(json.loads(Path(config).read_text()))
    except Exception:  # noqa: BLE001 - no answer from the hub: let from_pretrained report it
        return False


# ---- conversion -------------------------------------------------------------------------


def _parse_depths(depths: Any) -> list[int]:
    return [int(d) for d in depths.split("-")] if isinstance(depths, str) else list(depths)


def _tower_config(orig: dict, model_type: str) -> dict:
    unsupported = {
        "layernorm": "RMSNorm",
        "conv_norm": "none",
        "causal": True,
        "disable_last_norm": True,
        "mixer_layer": "depthwise_conv",
    }
    for key, wanted in unsupported.items():
        if orig.get(key, wanted) != wanted:
            raise PoolError(
                ErrorKind.BAD_INPUT, f"cannot convert a tokenizer with {key}={orig[key]!r}"
            )
    return {
        "model_type": model_type,
        "channels": orig.get("channels", 1),
        "hidden_size": orig["vae_dim"],
        "kernel_size": orig.get("kernel_size", 7),
        "num_filters": orig.get("encoder_n_filters", 32),
        "downsampling_ratios": list(reversed(orig.get("encoder_ratios", [8, 5, 5, 4, 2, 2]))),
        "depths": _parse_depths(orig.get("encoder_depths", "3-3-3-3-3-3-8")),
        "rms_norm_eps": orig.get("layernorm_eps", 1e-5),
        "layer_scale_init_value": orig.get("layer_scale_init_value", 1e-6),
        "initializer_range": orig.get("weight_init_value", 0.01),
        "vae_std": float(orig.get("fix_std", 0.5)) / 0.8,  # the original scales its std by 1/0.8
    }


def hf_config_from_original(orig: dict, token_ids: dict[str, int]) -> dict:
    """VibeVoiceConfig kwargs (transformers 5.23) from an original config.json."""
    text = dict(orig["decoder_config"])
    if "torch_dtype" in text:
        text["dtype"] = text.pop("torch_dtype")
    theta = text.pop("rope_theta", None)
    scaling = text.pop("rope_scaling", None)
    if theta is not None and scaling is None:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    head = orig.get("diffusion_head_config", {})
    return {
        "text_config": text,
        "audio_config": _tower_config(
            orig["acoustic_tokenizer_config"], "vibevoice_acoustic_tokenizer"
        ),
        "semantic_model_config": _tower_config(
            orig["semantic_tokenizer_config"], "vibevoice_acoustic_tokenizer_encoder"
        ),
        "diffusion_head_config": {
            "num_hidden_layers": head.get("head_layers", 4),
            "intermediate_size": int(head.get("head_ffn_ratio", 3.0) * text["hidden_size"]),
            "rms_norm_eps": head.get("rms_norm_eps", 1e-5),
        },
        "pad_token_id": token_ids["pad"],
        "eos_token_id": token_ids["eos"],
        "audio_bos_token_id": token_ids["audio_bos"],
        "audio_eos_token_id": token_ids["audio_eos"],
        "audio_token_id": token_ids["audio"],
    }


# The Qwen2.5 each checkpoint grew from, by width (1.5B, Large): one vocabulary in both
# tokenizers; the models only pad their embeddings differently (151,936, 152,064 rows).
QWEN_BY_WIDTH = {1536: "Qwen/Qwen2.5-1.5B", 3584: "Qwen/Qwen2.5-7B"}


def tokenizer_source(src: Path, orig: dict) -> str:
    """The tokenizer a conversion loads when none is given: `src`'s own files, else its
    preprocessor_config's `language_model_pretrained_name`, else the decoder's Qwen2.5."""
    if (src / "tokenizer.json").is_file():
        return str(src)
    pre = src / "preprocessor_config.json"
    conf = json.loads(pre.read_text()) if pre.is_file() else {}
    width = orig.get("decoder_config", {}).get("hidden_size")
    named = conf.get("language_model_pretrained_name")
    return named or QWEN_BY_WIDTH.get(width, QWEN_BY_WIDTH[1536])


def _load_tokenizer(src: Path, tokenizer: str | None, orig: dict) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer or tokenizer_source(src, orig))
    tok.padding_side = "left"
    return tok


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, tokenizer: str | None = None
) -> str:
    """Write an HF-layout copy of the original-layout checkpoint `src` (folder or hub id)
    into `dst`. The tokenizer comes from `tokenizer`, else `tokenizer_source` (a download
    unless `src` holds tokenizer files).
    """
    import torch
    from safetensors.torch import load_file
    from transformers import (
        VibeVoiceAcousticTokenizerFeatureExtractor,
        VibeVoiceConfig,
        VibeVoiceForConditionalGeneration,
        VibeVoiceProcessor,
    )

    from workers.checkpoints.tiny import (
        AUDIO_BOS,
        AUDIO_EOS,
        AUDIO_TOKEN,
        CHAT_TEMPLATE,
        configure_generation,
    )

    source = Path(src)
    if not source.is_dir():
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(str(src)))
    if not looks_like_original_layout(source):
        raise PoolError(
            ErrorKind.BAD_INPUT, f"{src} is not an original-layout VibeVoice checkpoint"
        )
    orig = json.loads((source / "config.json").read_text())
    tok = _load_tokenizer(source, tokenizer, orig)
    ids = {
        "pad": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        "eos": tok.eos_token_id,
        "audio_bos": tok.convert_tokens_to_ids(AUDIO_BOS),
        "audio_eos": tok.convert_tokens_to_ids(AUDIO_EOS),
        "audio": tok.convert_tokens_to_ids(AUDIO_TOKEN),
    }
    config = VibeVoiceConfig(**hf_config_from_original(orig, ids))

    state: dict[str, Any] = {}
    for file in sorted(source.glob("*.safetensors")):
        for key, tensor in load_file(str(file)).items():
            state[original_to_hf_key(key)] = tensor
    if not state:
        raise PoolError(ErrorKind.BAD_INPUT, f"{src} holds no *.safetensors weights")
    with torch.device("meta"):
        model = VibeVoiceForConditionalGeneration(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        detail = f"missing {missing[:5]} unexpected {unexpected[:5]}"
        raise PoolError(ErrorKind.BAD_INPUT, f"{src}: weights do not match VibeVoice ({detail})")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    for name, buf in list(model.named_buffers()):  # non-persistent buffers: rebuilt on load
        if buf.is_meta:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], torch.empty(buf.shape, dtype=buf.dtype))

    head = orig.get("diffusion_head_config", {})
    configure_generation(model.generation_config, ids["audio"], bias=False)
    sched = model.generation_config.noise_scheduler_config
    sched["num_train_timesteps"] = head.get("ddpm_num_steps", 1000)
    sched["prediction_type"] = head.get("prediction_type", "v_prediction")
    model.generation_config.pad_token_id = ids["pad"]
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.max_new_tokens = None

    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    pre = source / "preprocessor_config.json"
    audio = json.loads(pre.read_text()).get("audio_processor", {}) if pre.is_file() else {}
    feature_extractor = VibeVoiceAcousticTokenizerFeatureExtractor(
        sampling_rate=audio.get("sampling_rate", 24000),
        normalize_audio=audio.get("normalize_audio", True),
        target_dB_FS=audio.get("target_dB_FS", -25),
        eps=audio.get("eps", 1e-6),
        pad_to_multiple_of=3200,
    )
    VibeVoiceProcessor(feature_extractor, tok, chat_template=CHAT_TEMPLATE).save_pretrained(out)
    pin_left_padding(out)
    return str(out)


def pin_left_padding(folder: str | os.PathLike) -> None:
    """Write `padding_side: left` into the saved tokenizer config. transformers does not
    always save the side, and a checkpoint that loads padding right corrupts the shorter
    rows of a batch (microsoft always pads left). The engine pads left by itself anyway
    (workers/engines/vibevoice/prompt.py); this keeps the files true for any other reader."""
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if config.get("padding_side") != "left":
        config["padding_side"] = "left"
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# ---- a small original-layout checkpoint, for tests ------------------------------------


def original_config_from_tiny(hf: dict) -> dict:
    """The original-layout config.json that describes the tiny model's architecture."""

    def tower(t: dict, std: float) -> dict:
        return {
            "vae_dim": t["hidden_size"],
            "encoder_n_filters": t["num_filters"],
            "decoder_n_filters": t["num_filters"],
            "encoder_ratios": list(reversed(t["downsampling_ratios"])),
            "encoder_depths": "-".join(str(d) for d in t["depths"]),
            "kernel_size": t["kernel_size"],
            "fix_std": std,
            "layernorm": "RMSNorm",
            "layernorm_eps": t.get("rms_norm_eps", 1e-5),
            "mixer_layer": "depthwise_conv",
            "disable_last_norm": True,
            "conv_norm": "none",
            "conv_bias": True,
            "causal": True,
            "pad_mode": "constant",
            "weight_init_value": t.get("initializer_range", 0.01),
        }

    text = dict(hf["text_config"])
    head = hf["diffusion_head_config"]
    return {
        "model_type": "vibevoice",
        "architectures": ["VibeVoiceForConditionalGeneration"],
        "acoustic_vae_dim": hf["audio_config"]["hidden_size"],
        "semantic_vae_dim": hf["semantic_model_config"]["hidden_size"],
        "acoustic_tokenizer_config": {
            "model_type": "vibevoice_acoustic_tokenizer",
            "std_dist_type": "gaussian",
            **tower(hf["audio_config"], 0.5),
        },
        "semantic_tokenizer_config": {
            "model_type": "vibevoice_semantic_tokenizer",
            "std_dist_type": "none",
            **tower(hf["semantic_model_config"], 0),
        },
        "decoder_config": {**text, "torch_dtype": "float32", "rope_theta": 1_000_000.0},
        "diffusion_head_config": {
            "model_type": "vibevoice_diffusion_head",
            "hidden_size": text["hidden_size"],
            "head_layers": head["num_hidden_layers"],
            "head_ffn_ratio": head["intermediate_size"] / text["hidden_size"],
            "rms_norm_eps": 1e-5,
            "latent_size": hf["audio_config"]["hidden_size"],
            "speech_vae_dim": hf["audio_config"]["hidden_size"],
            "prediction_type": "v_prediction",
            "diffusion_type": "ddpm",
            "ddpm_num_steps": 1000,
            "ddpm_num_inference_steps": 20,
            "ddpm_beta_schedule": "cosine",
            "ddpm_batch_mul": 4,
        },
        "torch_dtype": "float32",
    }


def make_original_layout_checkpoint(directory: str | os.PathLike, seed: int = 1234) -> str:
    """Write the tiny model's weights under their original names, with an original-style
    config.json and preprocessor_config.json. The tiny tokenizer files are kept alongside
    (the real checkpoint has none; conversion then downloads the Qwen tokenizer)."""
    from safetensors.torch import load_file, save_file

    from workers.checkpoints.tiny import make_tiny_model, tiny_config_dict

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = Path(make_tiny_model(tmp, seed=seed))
        hf_config = json.loads((tiny / "config.json").read_text())
        weights = load_file(str(tiny / "model.safetensors"))
        renamed = {hf_to_original_key(k): v.contiguous() for k, v in weights.items()}
        save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny / name, out / name)
    ids = {k: hf_config[f"{k}_token_id"] for k in ("pad", "eos", "audio_bos", "audio_eos", "audio")}
    shape = tiny_config_dict(hf_config["text_config"]["vocab_size"], ids)
    (out / "config.json").write_text(json.dumps(original_config_from_tiny(shape), indent=2))
    preprocessor = {
        "processor_class": "VibeVoiceProcessor",
        "speech_tok_compress_ratio": 3200,
        "db_normalize": True,
        "audio_processor": {
            "feature_extractor_type": "VibeVoiceTokenizerProcessor",
            "sampling_rate": 24000,
            "normalize_audio": True,
            "target_dB_FS": -25,
            "eps": 1e-6,
        },
        "language_model_pretrained_name": "Qwen/Qwen2.5-1.5B",
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return str(out)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Convert an original VibeVoice checkpoint")
    parser.add_argument("src", help="original-layout folder or hub id (microsoft/VibeVoice-1.5B)")
    parser.add_argument("dst", help="new folder for the HF-layout checkpoint")
    parser.add_argument("--tokenizer", help="tokenizer folder or hub id (default: see docs)")
    args = parser.parse_args(argv)
    print(convert_checkpoint(args.src, args.dst, tokenizer=args.tokenizer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
