"""The weight names of VibeVoice's two checkpoint layouts, one into the other.

Owns the mapping between an original microsoft/VibeVoice checkpoint's weight names and
the HF layout's (`VibeVoiceForConditionalGeneration` in transformers): the three
tokenizer towers (stem and conv layers against downsample/upsample layers and stages),
the connectors and the diffusion head. Names in, names out; convert.py renames a
checkpoint's weights with it, and writes the tests' original-layout checkpoint.

The names were worked out from the original modules (SConv1d/NormConv1d wrappers,
`downsample_layers`/`upsample_layers` + `stages`, `prediction_head`, `*_connector` with
fc1/norm/fc2) against transformers 5.23's (`stem`/`conv_layers`, `diffusion_head`,
`multi_modal_projector`/`semantic_connector` with linear_1/act/linear_2); the rules are ours.
"""

from __future__ import annotations

import re

_TOWERS = (  # (HF prefix, original prefix, is a decoder)
    ("model.audio_tower.encoder.", "model.acoustic_tokenizer.encoder.", False),
    ("model.audio_tower.decoder.", "model.acoustic_tokenizer.decoder.", True),
    ("model.semantic_tokenizer_encoder.", "model.semantic_tokenizer.encoder.", False),
)
_RENAMES = (  # (HF, original): plain prefix swaps, longest first where they overlap
    ("model.latent_scaling_factor", "model.speech_scaling_factor"),
    ("model.latent_bias_factor", "model.speech_bias_factor"),
    ("model.multi_modal_projector.linear_1.", "model.acoustic_connector.fc1."),
    ("model.multi_modal_projector.act.", "model.acoustic_connector.norm."),
    ("model.multi_modal_projector.linear_2.", "model.acoustic_connector.fc2."),
    ("model.semantic_connector.linear_1.", "model.semantic_connector.fc1."),
    ("model.semantic_connector.act.", "model.semantic_connector.norm."),
    ("model.semantic_connector.linear_2.", "model.semantic_connector.fc2."),
    ("model.diffusion_head.timestep_proj.fc1.", "model.prediction_head.t_embedder.mlp.0."),
    ("model.diffusion_head.timestep_proj.fc2.", "model.prediction_head.t_embedder.mlp.2."),
    (
        "model.diffusion_head.final_layer.linear_1.",
        "model.prediction_head.final_layer.adaLN_modulation.1.",
    ),
    ("model.diffusion_head.final_layer.linear_2.", "model.prediction_head.final_layer.linear."),
    ("model.diffusion_head.", "model.prediction_head."),
)
_HEAD_LAYER = (
    r"^(model\.diffusion_head\.layers\.\d+\.)linear\.",
    r"^(model\.prediction_head\.layers\.\d+\.)adaLN_modulation\.1\.",
)


def _tower_to_original(rest: str, decoder: bool) -> str:
    sample = "upsample_layers" if decoder else "downsample_layers"
    conv = "convtr.convtr." if decoder else "conv.conv."
    rest = re.sub(r"mixer\.conv\.", "mixer.conv.conv.conv.", rest)
    if rest.startswith("stem.conv.conv."):
        return f"{sample}.0.0.conv.conv." + rest[len("stem.conv.conv.") :]
    if m := re.match(r"stem\.stage\.(\d+)\.(.*)", rest):
        return f"stages.0.{m[1]}.{m[2]}"
    if m := re.match(r"conv_layers\.(\d+)\.stage\.(\d+)\.(.*)", rest):
        return f"stages.{int(m[1]) + 1}.{m[2]}.{m[3]}"
    if m := re.match(rf"conv_layers\.(\d+)\.{re.escape(conv)}(.*)", rest):
        return f"{sample}.{int(m[1]) + 1}.0.{conv}{m[2]}"
    if rest.startswith("head.conv."):
        return "head.conv.conv." + rest[len("head.conv.") :]
    return rest


def _tower_to_hf(rest: str, decoder: bool) -> str:
    sample = "upsample_layers" if decoder else "downsample_layers"
    conv = "convtr.convtr." if decoder else "conv.conv."
    rest = re.sub(r"mixer\.conv\.conv\.conv\.", "mixer.conv.", rest)
    if rest.startswith(f"{sample}.0.0.conv.conv."):
        return "stem.conv.conv." + rest[len(f"{sample}.0.0.conv.conv.") :]
    if m := re.match(rf"{sample}\.(\d+)\.0\.{re.escape(conv)}(.*)", rest):
        return f"conv_layers.{int(m[1]) - 1}.{conv}{m[2]}"
    if m := re.match(r"stages\.(\d+)\.(\d+)\.(.*)", rest):
        stage = int(m[1])
        return (
            f"stem.stage.{m[2]}.{m[3]}"
            if stage == 0
            else f"conv_layers.{stage - 1}.stage.{m[2]}.{m[3]}"
        )
    if rest.startswith("head.conv.conv."):
        return "head.conv." + rest[len("head.conv.conv.") :]
    return rest


def hf_to_original_key(key: str) -> str:
    """The original-layout name of an HF VibeVoice weight."""
    for hf, orig, decoder in _TOWERS:
        if key.startswith(hf):
            return orig + _tower_to_original(key[len(hf) :], decoder)
    key = re.sub(_HEAD_LAYER[0], r"\1adaLN_modulation.1.", key)
    for hf, orig in _RENAMES:
        if key.startswith(hf):
            return orig + key[len(hf) :]
    return key


def original_to_hf_key(key: str) -> str:
    """The HF name of an original-layout VibeVoice weight."""
    for hf, orig, decoder in _TOWERS:
        if key.startswith(orig):
            return hf + _tower_to_hf(key[len(orig) :], decoder)
    key = re.sub(_HEAD_LAYER[1], r"\1linear.", key)
    for hf, orig in _RENAMES:
        if key.startswith(orig):
            return hf + key[len(orig) :]
    return key
