"""The pipeline's hub round trip (whole-folder upload, filtered download), its diffusers error wording, and prompts
encoded once for `num_images_per_prompt` (maintainer review)."""

import fnmatch
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_tuna2 import Tuna2Pipeline, pipeline_tuna2
from tuna2_training.tiny import build_processor, tiny_model

SIZE = dict(height=32, width=48)


@pytest.fixture(scope="module")
def pipe(tokenizer):
    pipeline = Tuna2Pipeline(model=tiny_model(tokenizer), processor=build_processor(tokenizer))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def files_in(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------- push to hub


def test_push_to_hub_uploads_the_whole_folder_once(tmp_path, pipe, monkeypatch):
    created, uploads = [], []

    def create_repo(repo_id, **options):
        created.append((repo_id, options))
        return SimpleNamespace(repo_id=f"someone/{repo_id}")

    def upload_folder(repo_id, folder_path, **options):
        uploads.append((repo_id, files_in(folder_path), options))

    monkeypatch.setattr(pipeline_tuna2, "create_repo", create_repo)
    monkeypatch.setattr(pipeline_tuna2, "upload_folder", upload_folder)
    folder = tmp_path / "tuna2-tiny"
    pipe.save_pretrained(folder, push_to_hub=True, private=True, commit_message="tiny")

    assert created == [("tuna2-tiny", {"exist_ok": True, "private": True, "token": None})]
    assert len(uploads) == 1
    repo_id, uploaded, options = uploads[0]
    assert repo_id == "someone/tuna2-tiny" and options["commit_message"] == "tiny"
    assert uploaded == files_in(folder)
    for name in ("model.safetensors", "config.json", "model_index.json", "scheduler/scheduler_config.json",
                 "tokenizer.json", "processor_config.json", "chat_template.jinja"):  # fmt: skip
        assert name in uploaded, name


# ---------------------------------------------------------------------------------------------------- download


HUB_REPO = [
    "README.md",
    "config.json",
    "generation_config.json",
    "model_index.json",
    "chat_template.jinja",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "scheduler/scheduler_config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "model.fp16-00001-of-00002.safetensors",
    "model.fp16-00002-of-00002.safetensors",
    "model.safetensors.index.fp16.json",
    "pytorch_model.fp16.bin",
    "model.bf16.safetensors",
    "tuna2_official.pt",
    "examples/edit.png",
]


def downloaded(allow_patterns) -> set[str]:
    return {name for name in HUB_REPO if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns)}


@pytest.fixture
def hub_requests(tmp_path, monkeypatch):
    """A hub holding HUB_REPO whose `snapshot_download` records its options and returns `tmp_path / "snapshot"`."""
    requests = []

    def snapshot_download(repo_id, **download_options):
        requests.append(download_options)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(pipeline_tuna2, "list_repo_files", lambda repo_id, **kw: HUB_REPO)
    monkeypatch.setattr(pipeline_tuna2, "snapshot_download", snapshot_download)
    return requests


@pytest.mark.parametrize(
    "options, weights",
    [
        ({}, {"model.safetensors"}),
        ({"use_safetensors": False}, {"pytorch_model.bin"}),
        (
            {"variant": "fp16"},
            {
                "model.fp16-00001-of-00002.safetensors",
                "model.fp16-00002-of-00002.safetensors",
                "model.safetensors.index.fp16.json",
            },
        ),
        ({"variant": "bf16"}, {"model.bf16.safetensors"}),
    ],
)
def test_hub_download_brings_one_variant_in_one_format(tmp_path, hub_requests, options, weights):
    assert Tuna2Pipeline.download("someone/tuna2", **options) == tmp_path / "snapshot"

    (request,) = hub_requests
    configs = {name for name in HUB_REPO if name.endswith((".json", ".jinja")) and "model." not in name}
    assert downloaded(request["allow_patterns"]) == configs | weights


def test_loading_a_hub_variant_downloads_only_it(tmp_path, pipe, hub_requests):
    pipe.save_pretrained(tmp_path / "snapshot", variant="fp16")
    loaded = Tuna2Pipeline.from_pretrained("someone/tuna2", variant="fp16", revision="main")
    assert torch.equal(loaded.model.lm_head.weight, pipe.model.lm_head.weight)
    (request,) = hub_requests
    assert request["revision"] == "main"
    weights = {name for name in downloaded(request["allow_patterns"]) if name.startswith(("model.", "pytorch_model"))}
    assert weights == {
        "model.fp16-00001-of-00002.safetensors",
        "model.fp16-00002-of-00002.safetensors",
        "model.safetensors.index.fp16.json",
    }


# ---------------------------------------------------------------------------------------------------- errors


def test_missing_variant_error_has_diffusers_wording(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"You are trying to load the model files of the `variant=fp16`"):
        Tuna2Pipeline.from_pretrained(tmp_path, variant="fp16")


# ---------------------------------------------------------------------------------------------- images per prompt


def prefix_rows(pipe, **kwargs) -> tuple[list[int], torch.Tensor]:
    """The rows of each prefix run (the model calls without `timesteps`) during one call, and its images."""
    rows = []

    def count(module, args, kwargs):
        if kwargs.get("timesteps") is None:
            rows.append(kwargs["input_ids"].shape[0])

    handle = pipe.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        images = pipe(**kwargs).images
    finally:
        handle.remove()
    return rows, images


def source_image(seed):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8))


@pytest.mark.parametrize("editing", [False, True])
def test_each_prompt_is_encoded_once_for_all_its_images(pipe, editing):
    seeds = [torch.Generator().manual_seed(seed) for seed in range(6)]
    common = dict(num_inference_steps=3, guidance_scale=2.0, output_type="np", **SIZE)
    sources = [source_image(1), source_image(2)] if editing else None
    rows, images = prefix_rows(
        pipe, prompt=["a red circle", "a blue square"], image=sources, num_images_per_prompt=3, generator=seeds,
        **common,
    )  # fmt: skip
    assert rows == [4]  # two prompts and their two negatives, once
    # the same images as encoding each repeated prompt, as before
    seeds = [torch.Generator().manual_seed(seed) for seed in range(6)]
    repeated_sources = [item for item in sources for _ in range(3)] if editing else None
    rows, expected = prefix_rows(
        pipe, prompt=["a red circle"] * 3 + ["a blue square"] * 3, image=repeated_sources, generator=seeds, **common
    )
    assert rows == [12]
    assert np.array_equal(images, expected)


def test_images_per_prompt_without_the_prefix_cache(pipe):
    kwargs = dict(prompt=["a", "b"], num_images_per_prompt=2, num_inference_steps=2, output_type="latent", **SIZE)
    seeds = [torch.Generator().manual_seed(seed) for seed in range(4)]
    full = pipe(**kwargs, generator=seeds, use_prefix_cache=False).images
    seeds = [torch.Generator().manual_seed(seed) for seed in range(4)]
    cached = pipe(**kwargs, generator=seeds).images
    assert full.shape == (4, 3, 32, 48)
    assert (full - cached).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------- encode_prompt


@pytest.mark.parametrize("use_prefix_cache", [True, False])
@pytest.mark.parametrize("editing", [False, True])
def test_encode_prompt_works_in_isolation(tokenizer, editing, use_prefix_cache):
    """As diffusers' `PipelineTesterMixin.test_encode_prompt_works_in_isolation`: a pipeline with only the components
    `encode_prompt` needs (the model runs the prefix; no scheduler) encodes, and the call given its output draws the
    images of the call given the prompts; the encoded prompt serves several calls."""
    model, processor = tiny_model(tokenizer), build_processor(tokenizer)
    encoder = Tuna2Pipeline(model=model, processor=processor, scheduler=None)
    sources = [source_image(1), source_image(2)] if editing else None
    with torch.no_grad():
        encoded = encoder.encode_prompt(
            ["a red circle", "a blue square"], "blurry", images=sources, use_prefix_cache=use_prefix_cache,
            num_images_per_prompt=2, **SIZE,
        )  # fmt: skip
    full = Tuna2Pipeline(model=model, processor=processor)
    full.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=2, guidance_scale=2.5, output_type="np")

    def seeds():
        return [torch.Generator().manual_seed(seed) for seed in range(4)]

    expected = full(
        ["a red circle", "a blue square"], image=sources, negative_prompt="blurry", num_images_per_prompt=2,
        generator=seeds(), use_prefix_cache=use_prefix_cache, **SIZE, **common,
    ).images  # fmt: skip
    for _ in range(2):
        assert np.array_equal(full(prompt_embeds=encoded, generator=seeds(), **common).images, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="a"), "Cannot forward both `prompt`"),
        (dict(negative_prompt="n"), "`negative_prompt` is encoded in `prompt_embeds`"),
        (dict(num_images_per_prompt=2), "`num_images_per_prompt` is encoded in `prompt_embeds`"),
        (dict(guidance_scale=1.0), "`prompt_embeds` holds negative prompts, which guidance_scale=1.0 does not match"),
    ],
)
def test_prompt_embeds_with_what_they_encode_is_refused(pipe, kwargs, message):
    with torch.no_grad():
        encoded = pipe.encode_prompt("a red circle", "blurry", **SIZE)
    with pytest.raises(ValueError, match=message):
        pipe(prompt_embeds=encoded, num_inference_steps=1, **kwargs)


# -------------------------------------------------------------------------------------------- optional components


def test_save_load_optional_components(tmp_path, tokenizer):
    """As diffusers' `PipelineTesterMixin.test_save_load_optional_components`: the optional scheduler set to None
    samples (the official Euler steps, as the default scheduler does), saves and loads as None."""
    pipe = Tuna2Pipeline(model=tiny_model(tokenizer), processor=build_processor(tokenizer))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle", num_inference_steps=3, output_type="latent", **SIZE)
    with_scheduler = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.scheduler = None
    output = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (output - with_scheduler).abs().max() <= 1e-5

    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == [None, None]
    assert not (tmp_path / "scheduler").exists()
    loaded = Tuna2Pipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler is None
    assert torch.equal(loaded(generator=torch.Generator().manual_seed(0), **kwargs).images, output)
