"""Tuna-2 for diffusers: image generation and editing on the weights of `transformers_tuna2`."""

from .pipeline_tuna2 import DEFAULT_EDIT_NEGATIVE_PROMPT, DEFAULT_NEGATIVE_PROMPT, Tuna2Pipeline

__all__ = ["DEFAULT_EDIT_NEGATIVE_PROMPT", "DEFAULT_NEGATIVE_PROMPT", "Tuna2Pipeline"]
