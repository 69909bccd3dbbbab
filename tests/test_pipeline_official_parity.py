"""Whole sampled images through Tuna2Pipeline against the official implementation's outputs (fp32)."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import OFFICIAL

from diffusers_tuna2 import Tuna2Pipeline
from transformers_tuna2 import Tuna2ImageProcessor, Tuna2Processor

CASES = json.loads((OFFICIAL / "cases.json").read_text())


@pytest.fixture(scope="module")
def official_pipe(official_model, official_tokenizer):
    pipeline = Tuna2Pipeline(model=official_model, processor=Tuna2Processor(Tuna2ImageProcessor(), official_tokenizer))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def check(pipeline_output, z_final, image_uint8, atol):
    z, images = pipeline_output
    torch.testing.assert_close(z, z_final[:, :, 0], atol=atol, rtol=0)
    assert np.abs(images.astype(int) - image_uint8.numpy().astype(int)).max() <= 1


@pytest.mark.parametrize("case", ["t2i_64x64", "t2i_64x96", "t2i_64x64_24steps"])
@pytest.mark.parametrize("use_prefix_cache", [True, False])
def test_text_to_image_from_the_official_seed(official_pipe, official_reference, case, use_prefix_cache):
    settings = CASES[case]
    kwargs = dict(
        height=settings["height"],
        width=settings["width"],
        negative_prompt=settings["negative_prompt"],
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        use_prefix_cache=use_prefix_cache,
    )
    outputs = [
        official_pipe(
            settings["prompt"],
            generator=torch.Generator().manual_seed(settings["seed"]),
            output_type=output_type,
            **kwargs,
        ).images
        for output_type in ("latent", "np")
    ]
    check(outputs, official_reference[f"{case}.z_final"], official_reference[f"{case}.image_uint8"], atol=5e-5)


@pytest.mark.parametrize("use_prefix_cache", [True, False])
def test_editing_from_the_official_initial_state(official_pipe, official_reference, use_prefix_cache):
    """The official edit pipeline draws training-style noise before its initial noise, so the seed alone does not
    give its z_0 (docs/deviations.md); its z_0 is passed as `latents`."""
    settings = CASES["edit_64x64"]
    source = PIL.Image.fromarray(official_reference["edit_64x64.source_uint8"].numpy())
    kwargs = dict(
        image=source,
        height=64,
        width=64,
        negative_prompt=settings["negative_prompt"],
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        latents=official_reference["edit_64x64.z_init"][:, :, 0],
        use_prefix_cache=use_prefix_cache,
    )
    outputs = [official_pipe(settings["instruction"], output_type=t, **kwargs).images for t in ("latent", "np")]
    check(outputs, official_reference["edit_64x64.z_final"], official_reference["edit_64x64.image_uint8"], atol=5e-5)
