"""Names of the official Tuna-2 (`Tuna2Pixel`) state-dict keys in `Tuna2ForConditionalGeneration`."""

import re

# (official prefix, our prefix), tried in order; the official `tuna.*` subtree is a stock Qwen2ForCausalLM.
OFFICIAL_PREFIXES = (
    ("tuna.model.", "model.language_model."),
    ("tuna.lm_head.", "lm_head."),
    ("vision_encoder.", "model.patch_embed."),
    ("time_embed.", "model.time_embed."),
    ("diffusion_head_a.", "flow_head.layers."),
    ("diffusion_head_b.", "flow_head.final_layer."),
    ("mask_token", "model.mask_token"),
)

# Wrappers that training and distributed checkpoints put in front of the keys.
WRAPPER_PREFIXES = re.compile(r"^(?:module\.|_orig_mod\.|_fsdp_wrapped_module\.|tuna_model\.)+")


def official_to_hf_key(key: str) -> str | None:
    """Our name for an official key (wrapper prefixes removed), or None when the key has no counterpart."""
    key = WRAPPER_PREFIXES.sub("", key)
    for official, ours in OFFICIAL_PREFIXES:
        if key.startswith(official):
            return ours + key[len(official) :]
    return None


def hf_to_official_key(key: str) -> str:
    """The official name of one of our keys (the inverse of `official_to_hf_key`)."""
    for official, ours in OFFICIAL_PREFIXES:
        if key.startswith(ours):
            return official + key[len(ours) :]
    raise KeyError(f"{key!r} has no counterpart in the official Tuna-2 state dict")
