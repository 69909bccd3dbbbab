"""Tuna-2 for diffusers: image generation and editing on the weights of `transformers_tuna2`."""

import importlib

# Names are imported on first access, so that `import diffusers_tuna2.cli` (the `tuna2` command and its `--help`)
# does not pay for importing torch, transformers and diffusers.
_LAZY_IMPORTS = {
    "DEFAULT_EDIT_NEGATIVE_PROMPT": ".pipeline_tuna2",
    "DEFAULT_NEGATIVE_PROMPT": ".pipeline_tuna2",
    "Tuna2EncodedPrompt": ".pipeline_tuna2",
    "Tuna2LoraLoaderMixin": ".lora_tuna2",
    "Tuna2Pipeline": ".pipeline_tuna2",
    "demo_model_path": ".demo",
}

__all__ = [
    "DEFAULT_EDIT_NEGATIVE_PROMPT",
    "DEFAULT_NEGATIVE_PROMPT",
    "Tuna2EncodedPrompt",
    "Tuna2LoraLoaderMixin",
    "Tuna2Pipeline",
    "demo_model_path",
]


def __getattr__(name: str):
    if name not in _LAZY_IMPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_IMPORTS[name], __name__), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
