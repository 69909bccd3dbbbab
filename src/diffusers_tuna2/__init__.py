"""Tuna-2 for diffusers: image generation and editing on the weights of `transformers_tuna2`."""
