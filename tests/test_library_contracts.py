"""What transformers' and diffusers' common tests expect of a processor, an image processor and a pipeline."""

import copy
import inspect
import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import StaticCache
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput

from diffusers_tuna2 import Tuna2Pipeline
from transformers_tuna2 import Tuna2ForConditionalGeneration, Tuna2ImageProcessor, Tuna2ImageRole, Tuna2Processor
from tuna2_training.tiny import build_processor, tiny_config, tiny_model

# ---------------------------------------------------------------------------------------------------- processor


@pytest.mark.parametrize("key", ["image", "path", "url"])
def test_chat_image_given_as_a_file_path_is_loaded(processor, tmp_path, key):
    """transformers' chat content items name an image by `image`, `url` or `path`; a string is loaded with
    `transformers.image_utils.load_image` (URLs, local paths, base64), the same loader for all three keys."""
    image = PIL.Image.new("RGB", (40, 24), "red")
    image.save(tmp_path / "red.png")

    def inputs(source):
        messages = [{"role": "user", "content": [{"type": "image", key: source}, {"type": "text", "text": "Hi"}]}]
        return processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )

    from_path, from_image = inputs(str(tmp_path / "red.png")), inputs(image)
    assert torch.equal(from_path.input_ids, from_image.input_ids)
    assert torch.equal(from_path.pixel_values, from_image.pixel_values)


def test_image_path_that_does_not_exist_raises(processor, tmp_path):
    with pytest.raises(ValueError, match="is not an image URL, an existing file or base64 data"):
        processor(text="<|image_pad|>", images=[str(tmp_path / "missing.png")])


@pytest.mark.parametrize("modality", ["videos", "audio"])
def test_processor_names_the_modality_it_does_not_take(processor, modality):
    assert modality not in inspect.signature(Tuna2Processor.__call__).parameters
    with pytest.raises(ValueError, match=f"does not take `{modality}`"):
        processor(text="Hi", **{modality: [torch.zeros(3, 8, 8)]})


UNSUPPORTED_IMAGE_OPTIONS = [
    dict(do_center_crop=True),
    dict(crop_size={"height": 8, "width": 8}),
    dict(do_pad=True),
]


@pytest.mark.parametrize("option", UNSUPPORTED_IMAGE_OPTIONS, ids=lambda option: next(iter(option)))
def test_image_options_that_are_not_honoured_raise(processor, option):
    name = next(iter(option))
    image = PIL.Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=f"does not support `{name}`"):
        Tuna2ImageProcessor(**option)
    with pytest.raises(ValueError, match=f"does not support `{name}`"):
        processor.image_processor(image, **option)
    with pytest.raises(ValueError, match=f"does not support `{name}`"):
        processor(text="<|image_pad|>", images=[image], **option)


def test_processor_passes_resize_options_to_the_image_processor(processor):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 80, 3), dtype=np.uint8))
    cropped = processor(text="<|image_pad|>", images=[image], resize_mode="center_crop", return_tensors="pt")
    expected = processor.image_processor(image, resize_mode="center_crop")["pixel_values"]
    assert torch.equal(cropped.pixel_values, expected)
    assert not torch.equal(cropped.pixel_values, processor.image_processor(image)["pixel_values"])


def test_saving_a_processor_leaves_it_unchanged(tmp_path):
    def state(processor):
        return processor.to_json_string(), processor.image_processor.to_json_string(), processor.tokenizer.init_kwargs

    processor = build_processor(size={"height": 32, "width": 48})
    processor.save_pretrained(tmp_path / "first")
    loaded = Tuna2Processor.from_pretrained(tmp_path / "first")
    for saved in (processor, loaded):
        before = copy.deepcopy(state(saved))
        saved.save_pretrained(tmp_path / "again")
        assert state(saved) == before


# ---------------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory, model, processor):
    path = tmp_path_factory.mktemp("pipeline")
    Tuna2Pipeline(model=model, processor=processor).save_pretrained(path)
    return path


def test_components_include_the_default_scheduler(model, processor):
    pipe = Tuna2Pipeline(model=model, processor=processor)
    assert set(pipe.components) == {"model", "processor", "scheduler"}
    assert isinstance(pipe.components["scheduler"], FlowMatchEulerDiscreteScheduler)
    assert Tuna2Pipeline(**pipe.components).scheduler is pipe.scheduler


@pytest.mark.parametrize(
    "dtype, expected",
    [
        ({"model": torch.bfloat16}, torch.bfloat16),
        ({"default": torch.bfloat16}, torch.bfloat16),
        ({"model": torch.float16, "default": torch.bfloat16}, torch.float16),
        ({"scheduler": torch.bfloat16}, torch.float32),  # as in diffusers: float32 without a "default"
    ],
)
def test_dtype_per_component(saved_pipeline, dtype, expected):
    assert Tuna2Pipeline.from_pretrained(saved_pipeline, dtype=dtype).model.dtype == expected
    assert Tuna2Pipeline.from_pretrained(saved_pipeline, torch_dtype=dtype).model.dtype == expected


def test_dtype_for_an_unknown_component_raises(saved_pipeline):
    with pytest.raises(ValueError, match="no component named 'transformer'"):
        Tuna2Pipeline.from_pretrained(saved_pipeline, dtype={"transformer": torch.bfloat16})


def test_encode_prompt_needs_the_prompt_only(model, processor):
    """diffusers' common `test_encode_prompt_works_in_isolation` fills encode_prompt's arguments by name from the
    call's inputs and fails on a required one it cannot fill."""
    pipe = Tuna2Pipeline(model=model, processor=processor)
    parameters = inspect.signature(pipe.encode_prompt).parameters.values()
    assert [p.name for p in parameters if p.default is inspect.Parameter.empty] == ["prompt"]
    encoded = pipe.encode_prompt("a red circle", use_prefix_cache=False)
    explicit = pipe.encode_prompt(["a red circle"], None, 32, 48, None, torch.device("cpu"), False)
    assert torch.equal(encoded.input_ids, explicit.input_ids)
    assert torch.equal(encoded.attention_mask, explicit.attention_mask)
    assert torch.equal(encoded.image_roles, explicit.image_roles)


def test_missing_variant_raises_a_value_error_naming_it(tmp_path, model, processor):
    Tuna2Pipeline(model=model, processor=processor).save_pretrained(tmp_path, variant="fp16")
    assert Tuna2Pipeline.from_pretrained(tmp_path, variant="fp16").model.dtype == torch.float32
    with pytest.raises(ValueError, match="`variant=bf16`"):
        Tuna2Pipeline.from_pretrained(tmp_path, variant="bf16")


# ------------------------------------------------------------------------------------------------------- model


def image_prompt(processor, model):
    """`input_ids`, `attention_mask` and `pixel_values` of one image and a caption, and the caption's labels."""
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    inputs = processor(text=f"{processor.image_token} a red circle", images=[image], return_tensors="pt")
    labels = inputs.input_ids.masked_fill(inputs.input_ids == model.config.image_token_id, -100)
    return inputs, labels


def test_return_dict_false_gives_the_output_as_a_tuple(processor, model):
    inputs, labels = image_prompt(processor, model)
    with torch.no_grad():
        as_output = model(**inputs, labels=labels)
        as_tuple = model(**inputs, labels=labels, return_dict=False)
        base_tuple = model.model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_output.loss)
    torch.testing.assert_close(as_tuple[1], as_output.logits)
    torch.testing.assert_close(model.lm_head(base_tuple[0]), as_output.logits)


def test_shift_labels_give_the_loss_of_the_labels(processor, model):
    inputs, labels = image_prompt(processor, model)
    shift_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    with torch.no_grad():
        from_labels = model(**inputs, labels=labels)
        from_shift_labels = model(**inputs, shift_labels=shift_labels)
    torch.testing.assert_close(from_shift_labels.loss, from_labels.loss)
    torch.testing.assert_close(from_shift_labels.lm_loss, from_labels.lm_loss)
    # The training forward (images by role) takes them too.
    roles = torch.tensor([Tuna2ImageRole.UNDERSTANDING])
    with torch.no_grad():
        torch.manual_seed(0)
        trained_labels = model(**inputs, image_roles=roles, labels=labels)
        torch.manual_seed(0)
        trained_shift = model(**inputs, image_roles=roles, shift_labels=shift_labels)
    assert trained_labels.lm_loss > 0
    torch.testing.assert_close(trained_shift.lm_loss, trained_labels.lm_loss)


def test_inputs_embeds_with_pixel_values_give_the_output_of_input_ids(processor, model):
    inputs, _ = image_prompt(processor, model)
    embeds = model.get_input_embeddings()(inputs.input_ids)
    with torch.no_grad():
        from_ids = model(**inputs).logits
        from_embeds = model(
            inputs_embeds=embeds, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values
        ).logits
    torch.testing.assert_close(from_embeds, from_ids)


def test_generation_from_inputs_embeds_with_an_image(processor, model):
    inputs, _ = image_prompt(processor, model)
    embeds = model.get_input_embeddings()(inputs.input_ids)
    prompt_length = inputs.input_ids.shape[1]
    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id}
    with torch.no_grad():
        from_ids = model.generate(**inputs, **options)[:, prompt_length:]
        from_embeds = model.generate(
            inputs_embeds=embeds, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values, **options
        )
        beams = {"num_beams": 2, **options}
        beam_from_ids = model.generate(**inputs, **beams)[:, prompt_length:]
        beam_from_embeds = model.generate(
            inputs_embeds=embeds, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values, **beams
        )
    assert torch.equal(from_embeds, from_ids)
    assert torch.equal(beam_from_embeds, beam_from_ids)


def test_assisted_decoding_with_an_assistant_model_on_an_image_prompt(processor, model, tokenizer, caplog):
    """transformers runs the assistant's first pass without `pixel_values`: the image tokens are embedded as text
    (with a warning), as in transformers' VLMs, and greedy assisted decoding gives greedy decoding's tokens."""
    inputs, _ = image_prompt(processor, model)
    assistant = tiny_model(tokenizer, seed=1).eval()
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id}
    with torch.no_grad():
        greedy = model.generate(**inputs, **options)
        assisted = model.generate(**inputs, assistant_model=assistant, **options)
    assert torch.equal(assisted, greedy)
    with caplog.at_level("WARNING"), torch.no_grad():
        assistant(input_ids=inputs.input_ids)
    assert "no pixel_values were given: the image tokens are embedded as text" in caplog.text


def test_get_image_features_follows_the_transformers_convention(processor, model):
    inputs, _ = image_prompt(processor, model)
    with torch.no_grad():
        features = model.model.get_image_features(inputs.pixel_values, output_hidden_states=True)
        as_tuple = model.model.get_image_features(inputs.pixel_values, return_dict=False)
    assert isinstance(features, ModelOutput) and isinstance(as_tuple, tuple)
    num_slots = int((inputs.input_ids == model.config.image_token_id).sum())
    assert features.last_hidden_state.shape == (num_slots, model.config.text_config.hidden_size)
    height, width = inputs.pixel_values.shape[-2:]
    assert features.image_grids == [(height // 16, width // 16)] and features.time_embeds.shape[0] == 1
    torch.testing.assert_close(as_tuple[0], features.last_hidden_state)


def test_image_features_are_a_pooled_output_with_one_entry_per_image(processor, model):
    """As transformers' VLMs give them (`BaseModelOutputWithPooling`): `pooler_output` holds each image's embeddings;
    no vision encoder, so no hidden states or attentions."""
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        features = model.model.get_image_features(images, output_hidden_states=True, output_attentions=True)
    assert isinstance(features, BaseModelOutputWithPooling)
    assert [tuple(span.shape) for span in features.pooler_output] == [(1 + 2 * 3, 128)] * 2
    torch.testing.assert_close(torch.cat(features.pooler_output), features.last_hidden_state)
    assert features.hidden_states is None and features.attentions is None


def test_base_model_tuple_holds_the_model_outputs_only(processor, model):
    """`return_dict=False` gives the outputs transformers' base models give."""
    inputs, _ = image_prompt(processor, model)
    with torch.no_grad():
        as_output = model.model(**inputs, use_cache=True)
        as_tuple = model.model(**inputs, use_cache=True, return_dict=False)
    assert len(as_tuple) == 3  # last_hidden_state, past_key_values, time_embeds
    torch.testing.assert_close(as_tuple[0], as_output.last_hidden_state)
    assert isinstance(as_tuple[1], type(as_output.past_key_values))
    torch.testing.assert_close(as_tuple[2], as_output.time_embeds)
    torch.testing.assert_close(as_output[2], as_output.time_embeds)


def test_config_return_dict_false_gives_tuples(processor, model):
    """`config.return_dict = False` makes the model return tuples; the model's own calls still read outputs."""
    inputs, labels = image_prompt(processor, model)
    config = copy.deepcopy(model.config)
    config.return_dict = False
    as_tuples = Tuna2ForConditionalGeneration(config).eval()
    as_tuples.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = model(**inputs, labels=labels)
        loss, logits, *_ = as_tuples(**inputs, labels=labels)
        features = as_tuples.model.get_image_features(inputs.pixel_values)
    torch.testing.assert_close(loss, expected.loss)
    torch.testing.assert_close(logits, expected.logits)
    assert isinstance(features, tuple)


def test_the_tied_lm_head_is_in_the_tensor_parallel_plan(model):
    assert model.tp_plan["lm_head"] == "colwise_gather_output"
    assert model.tp_plan["model.language_model.embed_tokens"] == "embedding_rowwise"


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 2.0},
    ],
)
def test_scaled_rope_goes_past_max_position_embeddings(tokenizer, rope_parameters):
    def model_with(rope):
        config = tiny_config(tokenizer)
        config.text_config.max_position_embeddings = 64
        config.text_config.rope_parameters = {**rope, "rope_theta": 10000.0}
        return Tuna2ForConditionalGeneration(config).eval()

    long_input = torch.full((1, 120), 5)
    with torch.no_grad():
        logits = model_with(rope_parameters)(input_ids=long_input).logits
    assert logits.shape[1] == long_input.shape[1] and torch.isfinite(logits).all()


def test_generation_with_a_static_cache_gives_the_dynamic_cache_tokens(processor, model):
    inputs, _ = image_prompt(processor, model)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id}
    with torch.no_grad():
        dynamic = model.generate(**inputs, **options)
        static = model.generate(**inputs, cache_implementation="static", **options)
    assert torch.equal(static, dynamic)


def test_the_decoding_step_compiles_as_one_graph(processor, model):
    """`_can_compile_fullgraph`: after an image prompt, a decoding step with a static cache compiles with
    `fullgraph=True` (no data-dependent branch) and gives the eager logits."""
    inputs, _ = image_prompt(processor, model)
    length = inputs.input_ids.shape[1]
    caches = [StaticCache(config=model.config.text_config, max_cache_len=length + 4) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            prompt = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        step = {
            "input_ids": prompt.logits[:, -1].argmax(-1, keepdim=True),
            "attention_mask": torch.ones(1, length + 1, dtype=torch.long),
            "position_ids": torch.tensor([[length]]),
            "use_cache": True,
        }
        eager = model(**step, past_key_values=caches[0]).logits
        compiled = torch.compile(model.forward, fullgraph=True)(**step, past_key_values=caches[1]).logits
    assert model._can_compile_fullgraph
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_saving_a_model_leaves_its_config_unchanged(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    model.save_pretrained(tmp_path)
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())  # remote code only when asked for
    assert not hasattr(model.config, "auto_map")


def test_the_pipeline_edits_an_image_given_as_a_path(tmp_path, model, processor):
    pipe = Tuna2Pipeline(model=model, processor=processor)
    pipe.set_progress_bar_config(disable=True)
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    image.save(tmp_path / "source.png")
    kwargs = {"num_inference_steps": 2, "guidance_scale": 1.0, "output_type": "latent"}
    from_image = pipe("make it blue", image=image, generator=torch.Generator().manual_seed(0), **kwargs).images
    for source in (str(tmp_path / "source.png"), tmp_path / "source.png"):
        from_path = pipe("make it blue", image=source, generator=torch.Generator().manual_seed(0), **kwargs).images
        assert torch.equal(from_path, from_image)


def test_the_pipeline_loads_through_the_diffusers_loader(tmp_path, model, processor, caplog):
    """With a `model_index.json`, `from_pretrained` is diffusers' own: its components' log and its options."""
    Tuna2Pipeline(model=model, processor=processor, guidance_scale=4.5).save_pretrained(tmp_path)
    with caplog.at_level("INFO", logger="diffusers.pipelines.pipeline_utils"):
        loaded = Tuna2Pipeline.from_pretrained(tmp_path, use_safetensors=True)
    assert "Loaded model as Tuna2ForConditionalGeneration from `model` subfolder" in caplog.text
    assert loaded.config.guidance_scale == 4.5 and "_name_or_path" not in json.loads(
        (tmp_path / "model_index.json").read_text()
    )
    (tmp_path / "model_index.json").unlink()  # a folder written by transformers alone
    plain = Tuna2Pipeline.from_pretrained(tmp_path)
    assert plain.config.guidance_scale == 3.0 and isinstance(plain.scheduler, FlowMatchEulerDiscreteScheduler)


def test_the_text_decoder_exports_with_a_static_cache(tokenizer):
    """`torch.export` of the model behind transformers' static-cache export recipe; greedy decoding with the
    exported program gives `generate()`'s tokens."""
    model = tiny_model(tokenizer).eval()
    model.generation_config.cache_implementation = "static"
    recipe = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=16)
    with torch.no_grad():
        step = {"input_ids": torch.tensor([[5]]), "cache_position": torch.tensor([0])}
        exported = torch.export.export(recipe, args=(), kwargs=step, strict=False).module()
        tokens = [5, 6, 7, 8]
        for position in range(9):
            logits = exported(input_ids=torch.tensor([[tokens[position]]]), cache_position=torch.tensor([position]))
            if position >= 3:
                tokens.append(int(logits[0, -1].argmax()))
        expected = model.generate(
            torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert tokens == expected[0].tolist()


def test_hub_options_reach_the_download(tmp_path, model, processor, monkeypatch):
    Tuna2Pipeline(model=model, processor=processor).save_pretrained(tmp_path)
    downloads = []

    def fake_download(repo_id, allow_patterns, **options):  # the patterns: tests/test_review_pipeline.py
        downloads.append((repo_id, options))
        return str(tmp_path)

    monkeypatch.setattr("diffusers_tuna2.pipeline_tuna2.snapshot_download", fake_download)
    Tuna2Pipeline.from_pretrained("org/tuna2", revision="v2", local_files_only=True, token="t")
    assert downloads == [("org/tuna2", {"revision": "v2", "local_files_only": True, "token": "t"})]


def test_a_transformers_folder_takes_the_pipeline_options(tmp_path, model, processor):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = Tuna2Pipeline.from_pretrained(tmp_path, guidance_scale=4.5, negative_prompt="")
    assert pipe.config.guidance_scale == 4.5 and pipe.config.negative_prompt == ""


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_the_command_line_picks_bfloat16_on_any_cuda_device(device):
    from argparse import Namespace

    from diffusers_tuna2.cli import settings

    assert settings(Namespace(device=device, dtype=None)) == (device, torch.bfloat16)
    assert settings(Namespace(device="cpu", dtype=None)) == ("cpu", torch.float32)
