"""The full-size VibeVoice architectures the GPU benchmarks build with random weights.

`full_size_config("1.5b")`: VibeVoice-1.5B (Qwen2.5-1.5B inside, 2.7 B parameters);
`full_size_config("large")`: VibeVoice-Large (Qwen2.5-7B inside, 9.34 B parameters, 17.4
GiB in bf16). Both share the towers and the diffusion head's depth; the head is as wide
as the LM. tests/test_large_checkpoint.py holds the Large's against its own config.json.
"""

from __future__ import annotations

QWEN25_1P5B = {  # the text model of VibeVoice-1.5B (Qwen2.5-1.5B)
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "tie_word_embeddings": True,
    "use_sliding_window": False,
}
QWEN25_7B = {  # the text model of VibeVoice-Large (Qwen2.5-7B): wider, 4 KV heads, untied
    **QWEN25_1P5B,
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}
TEXT_MODELS = {"1.5b": QWEN25_1P5B, "large": QWEN25_7B}
NAMES = {"1.5b": "VibeVoice-1.5B", "large": "VibeVoice-Large"}


def full_size_config(token_ids: dict | None = None, model: str = "1.5b"):
    """VibeVoice-1.5B's or VibeVoice-Large's config. `token_ids` (pad, eos, audio_bos,
    audio_eos, audio) replaces the Qwen2.5 special ids, for a folder whose tokenizer
    numbers them otherwise."""
    from transformers import VibeVoiceConfig

    text = TEXT_MODELS[model]
    ids = {"pad": 151643, "eos": 151643, "audio_bos": 151652, "audio_eos": 151653}
    ids = {**ids, "audio": 151654, **(token_ids or {})}

    tower = {
        "num_filters": 32,
        "kernel_size": 7,
        "downsampling_ratios": [2, 2, 4, 5, 5, 8],
        "depths": [3, 3, 3, 3, 3, 3, 8],
        "rms_norm_eps": 1e-5,
        "layer_scale_init_value": 1e-6,
        "vae_std": 0.625,
    }
    return VibeVoiceConfig(
        text_config=text,
        audio_config={"model_type": "vibevoice_acoustic_tokenizer", "hidden_size": 64, **tower},
        semantic_model_config={
            "model_type": "vibevoice_acoustic_tokenizer_encoder",
            "hidden_size": 128,
            **tower,
        },
        diffusion_head_config={
            "hidden_size": text["hidden_size"],  # 5.17 checks it, 5.23+ copies it
            "latent_size": 64,  # the acoustic latent
            "num_hidden_layers": 4,
            "intermediate_size": 3 * text["hidden_size"],  # head_ffn_ratio 3.0
            "frequency_embedding_size": 256,
            "rms_norm_eps": 1e-5,
        },
        pad_token_id=ids["pad"],
        eos_token_id=ids["eos"],
        audio_bos_token_id=ids["audio_bos"],
        audio_eos_token_id=ids["audio_eos"],
        audio_token_id=ids["audio"],
    )
