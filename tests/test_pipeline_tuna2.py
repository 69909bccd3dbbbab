import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from transformers import AutoModelForImageTextToText

from diffusers_tuna2 import Tuna2Pipeline
from tuna2_training.tiny import build_processor, tiny_model

SIZE = dict(height=32, width=48)
SHORT_NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def pipe(tokenizer):
    pipeline = Tuna2Pipeline(model=tiny_model(tokenizer, output_layout="patch"), processor=build_processor(tokenizer))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def seeded(*seeds):
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return generators[0] if len(generators) == 1 else generators


def source_image(seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
@pytest.mark.parametrize("editing", [False, True])
def test_cached_path_equals_full_recompute(pipe, editing, guidance_scale):
    kwargs = dict(
        prompt=["a red circle", "two blue squares on the left"],
        image=[source_image(1), source_image(2)] if editing else None,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        output_type="pt",
        **SIZE,
    )
    cached = pipe(**kwargs, generator=seeded(0, 1), use_prefix_cache=True).images
    full = pipe(**kwargs, generator=seeded(0, 1), use_prefix_cache=False).images
    assert cached.shape == (2, 3, 32, 48)
    assert (cached - full).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------- outputs


def test_output_types_and_shapes(pipe):
    kwargs = dict(prompt="a green triangle", num_inference_steps=2, negative_prompt=SHORT_NEGATIVE, **SIZE)
    pil = pipe(**kwargs, generator=seeded(0)).images
    assert len(pil) == 1 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (48, 32)
    array = pipe(**kwargs, generator=seeded(0), output_type="np").images
    assert array.dtype == np.uint8 and array.shape == (1, 32, 48, 3)
    assert np.array_equal(np.asarray(pil[0]), array[0])
    tensor = pipe(**kwargs, generator=seeded(0), output_type="pt").images
    assert tensor.shape == (1, 3, 32, 48) and tensor.min() >= 0 and tensor.max() <= 1
    latent = pipe(**kwargs, generator=seeded(0), output_type="latent").images
    torch.testing.assert_close(tensor, ((latent + 1) / 2).clamp(0, 1))
    expected = (((latent + 1) / 2).clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy().astype(np.uint8)  # truncation
    assert np.array_equal(array, expected)
    (as_tuple,) = pipe(**kwargs, generator=seeded(0), output_type="latent", return_dict=False)
    assert torch.equal(as_tuple, latent)


def test_num_images_per_prompt(pipe):
    out = pipe(["a", "b"], num_images_per_prompt=3, num_inference_steps=2, output_type="pt", **SIZE).images
    assert out.shape == (6, 3, 32, 48)


def test_each_image_depends_only_on_its_own_generator(pipe):
    kwargs = dict(num_inference_steps=3, output_type="latent", negative_prompt=SHORT_NEGATIVE, **SIZE)
    alone = pipe("a red circle", generator=seeded(7), **kwargs).images
    batch = pipe(["a blue square", "a red circle"], generator=seeded(3, 7), **kwargs).images
    assert (batch[1] - alone[0]).abs().max() <= 1e-5
    assert not torch.allclose(batch[0], batch[1])


def test_default_guidance_and_negative_prompts(pipe):
    calls = []
    original = pipe.encode_prompt

    def spy(prompts, negative_prompts, *args, **kwargs):
        calls.append(negative_prompts)
        return original(prompts, negative_prompts, *args, **kwargs)

    pipe.encode_prompt = spy
    try:
        pipe("x", num_inference_steps=1, **SIZE)
        assert pipe.guidance_scale == 3.0
        pipe("x", image=source_image(), num_inference_steps=1, **SIZE)
        assert pipe.guidance_scale == 2.0
        pipe("", negative_prompt="", num_inference_steps=1, **SIZE)  # an empty prompt is the unconditional one
        pipe("x", guidance_scale=1.0, num_inference_steps=1, **SIZE)
    finally:
        del pipe.encode_prompt
    from diffusers_tuna2 import DEFAULT_EDIT_NEGATIVE_PROMPT, DEFAULT_NEGATIVE_PROMPT

    assert calls[0] == DEFAULT_NEGATIVE_PROMPT and calls[1] == DEFAULT_EDIT_NEGATIVE_PROMPT
    assert calls[2] == "" and calls[3] is None


# ---------------------------------------------------------------------------------------------------- callbacks


def test_callback_that_edits_latents_takes_effect(pipe):
    seen = []
    replacement = torch.full((1, 3, 32, 48), 0.25)

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append(callback_kwargs["latents"].clone())
        return {"latents": replacement.clone()} if step == pipeline.num_timesteps - 1 else {}

    kwargs = dict(num_inference_steps=3, output_type="latent", negative_prompt=SHORT_NEGATIVE, **SIZE)
    out = pipe("a circle", generator=seeded(0), callback_on_step_end=callback, **kwargs).images
    assert len(seen) == 3
    assert torch.equal(out, replacement)
    plain = pipe("a circle", generator=seeded(0), **kwargs).images
    assert torch.equal(plain, seen[-1])


def test_interrupt_stops_early(pipe):
    steps = []

    def callback(pipeline, step, timestep, callback_kwargs):
        steps.append(step)
        if step == 1:
            pipeline._interrupt = True
        return {}

    kwargs = dict(negative_prompt=SHORT_NEGATIVE, output_type="latent", **SIZE)
    out = pipe("a circle", num_inference_steps=6, generator=seeded(0), callback_on_step_end=callback, **kwargs).images
    assert steps == [0, 1]
    # the state after two of six steps, not a finished image
    first_two = []
    pipe(
        "a circle",
        num_inference_steps=6,
        generator=seeded(0),
        callback_on_step_end=lambda p, i, t, kw: first_two.append(kw["latents"].clone()) or {},
        **kwargs,
    )
    assert torch.equal(out, first_two[1])


def test_heun_scheduler_runs(tokenizer):
    model = tiny_model(tokenizer)
    pipeline = Tuna2Pipeline(
        model=model, processor=build_processor(tokenizer), scheduler=FlowMatchHeunDiscreteScheduler()
    )
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline("a circle", num_inference_steps=3, generator=seeded(0), output_type="pt", **SIZE).images
    assert out.shape == (1, 3, 32, 48) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------- saving


def test_one_folder_for_both_libraries(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    weights = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors"))
    assert weights == ["model.safetensors"], weights
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "Tuna2Pipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]

    loaded = Tuna2Pipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path)
    for name, tensor in pipe.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)
        assert torch.equal(auto.state_dict()[name], tensor)
    assert isinstance(loaded.scheduler, FlowMatchEulerDiscreteScheduler)
    kwargs = dict(num_inference_steps=2, output_type="np", **SIZE)
    assert np.array_equal(
        pipe("a fox", generator=seeded(0), **kwargs).images, loaded("a fox", generator=seeded(0), **kwargs).images
    )


def test_checkpoint_default_negative_prompts_and_size(tmp_path, tokenizer):
    processor = build_processor(tokenizer, size={"height": 32, "width": 48})
    pipeline = Tuna2Pipeline(
        model=tiny_model(tokenizer), processor=processor, negative_prompt="", edit_negative_prompt=""
    )
    pipeline.save_pretrained(tmp_path)
    loaded = Tuna2Pipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.negative_prompt == "" and loaded.config.edit_negative_prompt == ""
    seen = []
    original = loaded.encode_prompt
    loaded.encode_prompt = lambda prompts, negatives, *args: (
        seen.append(negatives) or original(prompts, negatives, *args)
    )
    image = loaded("a circle", num_inference_steps=1).images[0]
    assert seen == [""] and image.size == (48, 32)  # the processor's fixed size when none is given


def test_pipeline_shares_the_models_tensors(tokenizer):
    model = tiny_model(tokenizer)
    pipeline = Tuna2Pipeline(model=model, processor=build_processor(tokenizer))
    assert pipeline.model is model
    for (name, mine), (_, theirs) in zip(model.named_parameters(), pipeline.model.named_parameters()):
        assert mine.data_ptr() == theirs.data_ptr(), name


def test_dtype_argument(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    assert Tuna2Pipeline.from_pretrained(tmp_path, dtype=torch.bfloat16).model.dtype == torch.bfloat16
    assert Tuna2Pipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).model.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=30), "multiples of the patch size 16"),
        (dict(width=0), "multiples of the patch size 16"),
        (dict(height=1024, width=1024), "past the model's max_position_embeddings"),
        (dict(prompt=["a", "b"], negative_prompt=["n"]), "`negative_prompt` has 1 entries but `prompt` has 2"),
        (dict(prompt=["a", "b"], generator=[torch.Generator()]), "got 1 generators for 2 images"),
        (dict(image=3), "`image` must be a PIL image, a numpy array, a tensor, a path or a URL"),
        (dict(image="picture.png"), "'picture.png' is not an image URL, an existing file or base64 data"),
        (dict(guidance_scale=-1.0), "`guidance_scale` must be >= 0"),
        (dict(num_inference_steps=0), "`num_inference_steps` must be an integer >= 1"),
        (dict(output_type="jpeg"), "`output_type` must be one of"),
        (dict(prompt=None), "Provide either `prompt` or `prompt_embeds`"),
        (dict(prompt=3), "`prompt` must be a string or a list of strings"),
        (dict(latents=torch.zeros(1, 3, 8, 8)), "`latents` must have shape"),
    ],
)
def test_bad_input_raises_clear_errors(pipe, kwargs, message):
    arguments = dict(prompt="a circle", num_inference_steps=1, **SIZE)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pipe(**arguments)


def test_hub_id_is_downloaded_first(tmp_path, pipe, monkeypatch):
    pipe.save_pretrained(tmp_path / "snapshot")
    requested = []

    def fake_snapshot_download(repo_id, **options):
        requested.append(repo_id)
        return str(tmp_path / "snapshot")

    files = [p.relative_to(tmp_path / "snapshot").as_posix() for p in (tmp_path / "snapshot").rglob("*")]
    monkeypatch.setattr("diffusers_tuna2.pipeline_tuna2.list_repo_files", lambda repo_id, **options: files)
    monkeypatch.setattr("diffusers_tuna2.pipeline_tuna2.snapshot_download", fake_snapshot_download)
    loaded = Tuna2Pipeline.from_pretrained("someone/tuna2-tiny")
    assert requested == ["someone/tuna2-tiny"]
    assert torch.equal(loaded.model.lm_head.weight, pipe.model.lm_head.weight)


def test_sampling_from_a_model_left_in_training_with_checkpointing_is_one_clear_error(tokenizer):
    """What `Trainer.train()` leaves: training mode and gradient checkpointing, under which the model runs without
    its KV cache, so that the cached denoising steps would not see their prefix."""
    model = tiny_model(tokenizer).train()
    model.gradient_checkpointing_enable()
    pipe = Tuna2Pipeline(model=model, processor=build_processor(tokenizer))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="training mode with gradient checkpointing.*pipe.model.eval"):
        pipe("a red circle", height=32, width=32, num_inference_steps=1, output_type="latent")
    latents = pipe("a red circle", height=32, width=32, num_inference_steps=1, output_type="latent",
                   use_prefix_cache=False).images  # fmt: skip
    assert torch.isfinite(latents).all()


def test_sampling_from_a_model_in_training_mode_warns(tokenizer, caplog):
    pipe = Tuna2Pipeline(model=tiny_model(tokenizer).train(), processor=build_processor(tokenizer))
    pipe.set_progress_bar_config(disable=True)
    with caplog.at_level("WARNING"):
        pipe("a red circle", height=32, width=32, num_inference_steps=1, output_type="latent")
    assert "the model is in training mode" in caplog.text
    caplog.clear()
    pipe.model.eval()
    with caplog.at_level("WARNING"):
        pipe("a red circle", height=32, width=32, num_inference_steps=1, output_type="latent")
    assert "training mode" not in caplog.text
