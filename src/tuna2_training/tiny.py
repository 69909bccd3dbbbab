"""Tiny Tuna-2 models and tokenizers built on the spot (no download), shared by the tests, the benchmarks and the
examples."""

import torch
from transformers import PreTrainedTokenizerFast

from transformers_tuna2 import (
    Tuna2Config,
    Tuna2ForConditionalGeneration,
    Tuna2ImageProcessor,
    Tuna2Processor,
)

from .tokenizer import train_byte_level_tokenizer

CORPUS = [
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "What is written on the sign? Describe the image in detail.",
    "a red circle, a blue square and a green triangle on a white background",
    "What colour is the shape? How many shapes are there? Where is the square?",
    "system user assistant",
]


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences, with the Qwen special tokens after the learned vocabulary."""
    return train_byte_level_tokenizer(CORPUS * 20, vocab_size)


def build_processor(tokenizer=None, **image_processor_kwargs) -> Tuna2Processor:
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    return Tuna2Processor(image_processor=Tuna2ImageProcessor(**image_processor_kwargs), tokenizer=tokenizer)


def tiny_config(tokenizer, **kwargs) -> Tuna2Config:
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    defaults = dict(
        text_config=text_config,
        flow_head_num_layers=2,
        flow_head_num_attention_heads=2,
        flow_head_num_key_value_heads=1,
        flow_head_intermediate_size=256,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    defaults.update(kwargs)
    return Tuna2Config(**defaults)


def tiny_tuna_r_config(tokenizer, **kwargs) -> Tuna2Config:
    """A tiny Tuna-R: the tiny Tuna-2 with a 3-layer SigLIP read at its second-to-last layer (as the 7B reads 26 of
    27), whose position table is for 32x32 images (2x2 patches), so that any other size resamples it."""
    vision_config = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    defaults = dict(vision_config=vision_config, vision_feature_layer=-2, use_mask_token=False)
    return tiny_config(tokenizer, **{**defaults, **kwargs})


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Redraws every parameter (norm weights around 1), so that the zero-initialised adaLN and final layer matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_((1.0 + noise) if "norm" in name else noise * (4 if "patch_embedding" in name else 1))
    return model


def tiny_model(tokenizer, seed: int = 0, **config_kwargs) -> Tuna2ForConditionalGeneration:
    torch.manual_seed(seed)
    model = Tuna2ForConditionalGeneration(tiny_config(tokenizer, **config_kwargs))
    return randomize_(model, seed).eval()


def tiny_tuna_r_model(tokenizer, seed: int = 0, **config_kwargs) -> Tuna2ForConditionalGeneration:
    """A tiny Tuna-R ([`tiny_tuna_r_config`]) with every parameter redrawn, as [`tiny_model`]."""
    torch.manual_seed(seed)
    model = Tuna2ForConditionalGeneration(tiny_tuna_r_config(tokenizer, **config_kwargs))
    return randomize_(model, seed).eval()
