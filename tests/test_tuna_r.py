"""Tuna-R, the paper's encoder variant, through the same public API as Tuna-2: config, model, pipeline, `generate()`,
training with LoRA, saving and loading, and the converters (official checkpoints, and a new model from Qwen2 and
SigLIP). Its numbers against the official implementation are in test_official_parity_2r.py."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import OFFICIAL_2R
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from test_training import one_batch, trainer_for
from training_data import write_dataset
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from diffusers_tuna2 import Tuna2Pipeline
from diffusers_tuna2.conversion import convert_main, init_main
from transformers_tuna2 import Tuna2Config, Tuna2ForConditionalGeneration, Tuna2ImageRole
from tuna2_training.tiny import build_processor, tiny_tuna_r_config, tiny_tuna_r_model
from tuna2_training.trainer import lora_target_modules

QWEN_TINY = Path(__file__).parent / "fixtures" / "conversion" / "qwen_tiny"
SIGLIP_TINY_CONFIG = OFFICIAL_2R / "siglip_tiny_config.json"


@pytest.fixture(scope="module")
def tuna_r(tokenizer):
    return tiny_tuna_r_model(tokenizer)


@pytest.fixture(scope="module")
def pipe(tuna_r, tokenizer):
    pipeline = Tuna2Pipeline(model=tuna_r, processor=build_processor(tokenizer))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def chat_inputs(processor, question="What is it?"):
    image = torch.randint(0, 256, (40, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def count_model_calls(model):
    """A list that grows by one at every forward of `model`, and the hook's handle, to remove it."""
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


# ---------------------------------------------------------------------------------------------------- model


def test_the_encoder_replaces_the_patch_embedding(tuna_r):
    """transformers' SigLIP vision model, truncated after the feature layer, without head or final LayerNorm, and
    the projector; the LLM, time embedding and flow head as in Tuna-2."""
    names = set(tuna_r.state_dict())
    assert not any(name.startswith("model.patch_embed.") for name in names)
    assert "model.mask_token" not in names
    assert {f"model.multi_modal_projector.{part}.weight" for part in ("norm", "linear_1", "linear_2")} <= names
    layers = {name.split(".")[4] for name in names if name.startswith("model.vision_tower.encoder.layers.")}
    assert layers == {"0", "1"}  # 2 of the 3 layers: the second-to-last is read
    assert not any("post_layernorm" in name or ".head." in name for name in names)
    assert isinstance(tuna_r.model.vision_tower, SiglipVisionModel)
    assert tuna_r.config.num_vision_layers == 2 and not tuna_r.config.vision_config.vision_use_head


def test_patch_features_are_siglip_features_of_the_pixels_as_given(tuna_r):
    """The noisy state itself goes through SigLIP (no normalisation), and the position table is resampled for a
    grid other than its own 2x2."""
    pixels = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2
    model = tuna_r.model
    with torch.no_grad():
        features = model.vision_tower(pixels, interpolate_pos_encoding=True).last_hidden_state
        assert torch.equal(model.embed_patches(pixels), model.multi_modal_projector(features))
        grid = model.vision_tower.embeddings.position_embedding.weight.reshape(1, 2, 2, 64).permute(0, 3, 1, 2)
        resampled = torch.nn.functional.interpolate(grid, size=(2, 3), mode="bicubic", align_corners=False)
        embeddings = model.vision_tower.embeddings(pixels, interpolate_pos_encoding=True)
        conv = model.vision_tower.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
    torch.testing.assert_close(embeddings - conv, resampled.permute(0, 2, 3, 1).reshape(1, 6, 64))


def test_bad_vision_settings_fail_clearly(tokenizer):
    with pytest.raises(ValueError, match="vision_feature_layer -4 is not a layer"):
        tiny_tuna_r_config(tokenizer, vision_feature_layer=-4)
    with pytest.raises(ValueError, match="must be the same"):
        tiny_tuna_r_config(tokenizer, patch_size=8)


def test_save_pretrained_from_pretrained_round_trip(tmp_path, tuna_r, tokenizer):
    processor = build_processor(tokenizer, size={"height": 32, "width": 48})
    tuna_r.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, Tuna2ForConditionalGeneration) and loaded.config.vision_config is not None
    assert loaded.config.vision_feature_layer == -2 and loaded.config.num_vision_layers == 2
    assert set(loaded.state_dict()) == set(tuna_r.state_dict())
    for name, tensor in tuna_r.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    inputs = chat_inputs(AutoProcessor.from_pretrained(tmp_path))
    as_target = {"timesteps": torch.tensor([0.5]), "image_roles": torch.tensor([Tuna2ImageRole.TARGET])}
    # The same tensors, but not bit for bit the same numbers: the loaded ones lie in the safetensors file's memory map
    # at offsets that may take other CPU matmul kernels (in fp32, rounding-level differences).
    with torch.no_grad():
        torch.testing.assert_close(tuna_r(**inputs).logits, loaded(**inputs).logits, atol=1e-5, rtol=0)
        x0, loaded_x0 = tuna_r(**inputs, **as_target).x0, loaded(**inputs, **as_target).x0
        torch.testing.assert_close(x0, loaded_x0, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- use


def test_answers_with_generate(tuna_r, tokenizer):
    """`generate()` with its cache gives the greedy tokens of full recomputations over the SigLIP features."""
    inputs = chat_inputs(build_processor(tokenizer, size={"height": 32, "width": 48}))
    with torch.no_grad():
        out = tuna_r.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        ids = inputs.input_ids
        for _ in range(4):
            logits = tuna_r(input_ids=ids, pixel_values=inputs.pixel_values, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ids.tolist()


def test_generates_with_the_official_tuna_r_sampling(pipe):
    """Heun by default: 2 model calls per step but the last (an Euler step), CFG doubling no call; the image is the
    final state min-max rescaled, so it spans the whole uint8 range."""
    config = pipe.config
    assert (config.sampling_method, config.guidance_scale, config.edit_guidance_scale) == ("heun", 4.0, 5.0)
    kwargs = dict(height=32, width=48, num_inference_steps=3, use_prefix_cache=False)
    calls, handle = count_model_calls(pipe.model)
    try:
        image = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    finally:
        handle.remove()
    assert len(calls) == 2 * 3 - 1
    assert image.shape == (1, 32, 48, 3) and image.min() == 0 and image.max() >= 254
    z = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images
    rescaled = (z - z.min()) / (z.max() - z.min() + 1e-5) * 2 - 1
    expected = (((rescaled + 1) / 2).clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1


def test_euler_is_one_call_per_step(pipe):
    calls, handle = count_model_calls(pipe.model)
    try:
        kwargs = dict(height=32, width=32, num_inference_steps=3, use_prefix_cache=False)
        pipe("a red circle", sampling_method="euler", **kwargs)
    finally:
        handle.remove()
    assert len(calls) == 3
    with pytest.raises(ValueError, match="sampling_method"):
        pipe("a red circle", height=32, width=32, num_inference_steps=1, sampling_method="dpm")


def test_edits_an_image(pipe):
    """SigLIP reads the clean source; editing changes with the source."""
    sources = [np.full((32, 32, 3), value, dtype=np.uint8) for value in (30, 220)]
    kwargs = dict(height=32, width=32, num_inference_steps=2, output_type="latent")
    edited = [
        pipe("make it blue", image=source, generator=torch.Generator().manual_seed(0), **kwargs).images
        for source in sources
    ]
    assert edited[0].shape == (1, 3, 32, 32) and not torch.allclose(edited[0], edited[1])


def test_trains_one_lora_step(tmp_path, tokenizer):
    """The training path of Tuna-2 (collator, trainer, model losses) with a LoRA on the LLM and the flow head: one
    step changes the adapters only; the SigLIP tower is not a LoRA target."""
    processor = build_processor(tokenizer, size={"height": 32, "width": 32})
    model = tiny_tuna_r_model(tokenizer)
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules("all"))
    data = write_dataset(tmp_path / "data")
    trainer = trainer_for(
        model, processor, data, tmp_path, steps=1, batch_size=4, learning_rate=1e-2, peft_config=peft_config
    )
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "flow_loss" in entry]
    assert log["flow_loss"] > 0 and np.isfinite(log["loss"])
    trained = trainer.model
    changed = [name for name, tensor in trained.named_parameters() if "lora_B" in name and tensor.any()]
    assert any("language_model" in name for name in changed) and any("flow_head" in name for name in changed)
    assert not any("vision_tower" in name for name, _ in trained.named_parameters() if "lora_" in name)
    for name, tensor in trained.get_base_model().state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, base_state[name.replace(".base_layer", "")]), name

    # The adapter loads into a Tuna-R pipeline, as a Tuna-2's does.
    trainer.save_model(str(tmp_path / "adapter"))
    kwargs = dict(height=32, width=32, num_inference_steps=2, output_type="latent", negative_prompt="blurry")
    pipe = Tuna2Pipeline(model=tiny_tuna_r_model(tokenizer), processor=processor)
    reference = Tuna2Pipeline(model=trained.eval(), processor=processor)
    for pipeline in pipe, reference:
        pipeline.set_progress_bar_config(disable=True)

    def sample(pipeline):
        return pipeline("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images

    expected = sample(reference)
    assert not torch.allclose(sample(pipe), expected, atol=1e-4)
    pipe.load_lora_weights(tmp_path / "adapter")
    torch.testing.assert_close(sample(pipe), expected, atol=1e-5, rtol=0)


def test_full_training_reaches_siglip_also_with_gradient_checkpointing(tmp_path, tokenizer):
    """A training batch of the four tasks: the losses reach every SigLIP weight (the official Tuna-R trains its
    encoder), with the same gradients when the LLM, the flow head and SigLIP checkpoint their layers."""
    processor = build_processor(tokenizer, size={"height": 32, "width": 32})
    batch = one_batch(write_dataset(tmp_path / "data"), processor)
    gradients = []
    for checkpointing in (False, True):
        model = tiny_tuna_r_model(tokenizer).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.vision_tower.encoder.layers[0].gradient_checkpointing
        torch.manual_seed(11)
        model(**batch).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    tower = [name for name, _ in model.named_parameters() if "vision_tower" in name]
    assert set(tower) <= gradients[0].keys() and gradients[0].keys() == gradients[1].keys()
    assert all(gradients[0][name].any() for name in tower)
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, atol=1e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------- converters


@pytest.fixture(scope="module")
def official_2r_state_dict():
    return load_file(OFFICIAL_2R / "official.safetensors")


@pytest.mark.parametrize("checkpoint_name", ["official.safetensors", "training.pt"])
def test_converts_an_official_tuna_r_checkpoint(
    tmp_path, official_2r_state_dict, official_2r_model, official_2r_reference, checkpoint_name
):
    """`tuna2 convert` recognises Tuna-R by its SigLIP weights; the folder holds the official tensors, reads the
    position table and feature layer off the shapes, and keeps Tuna-R's sampling defaults for the pipeline."""
    if checkpoint_name.endswith(".pt"):  # a training checkpoint's layout
        checkpoint = tmp_path / checkpoint_name
        torch.save({"model": {"tuna_model." + k: v for k, v in official_2r_state_dict.items()}}, checkpoint)
    else:
        checkpoint = OFFICIAL_2R / checkpoint_name
    output = tmp_path / "tuna-r"
    args = ["--checkpoint", str(checkpoint), "--tokenizer", str(QWEN_TINY), "--output", str(output)]
    assert convert_main([*args, "--siglip-config", str(SIGLIP_TINY_CONFIG)]) == 0
    pipeline = Tuna2Pipeline.from_pretrained(output)
    config = pipeline.model.config
    assert config.vision_config.image_size == 64 and config.vision_feature_layer == -2
    assert config.vision_config.num_hidden_layers == 3 and not config.use_mask_token
    for name, tensor in official_2r_model.state_dict().items():
        assert torch.equal(pipeline.model.state_dict()[name], tensor), name
    assert (pipeline.config.sampling_method, pipeline.config.guidance_scale) == ("heun", 4.0)
    ids = official_2r_reference["t2i_64x64.input_ids"]
    z = official_2r_reference["t2i_64x64.z_steps"][0][:, 0]
    t = official_2r_reference["t2i_64x64.t_steps"][0]
    with torch.no_grad():
        roles = torch.full((2,), Tuna2ImageRole.TARGET)
        x0 = pipeline.model(ids, torch.stack([z, z]), timesteps=torch.stack([t, t]), image_roles=roles).x0
    torch.testing.assert_close(x0, official_2r_reference["t2i_64x64.x0_branches"][0][:, :, 0], atol=1e-5, rtol=0)


def test_a_tuna_r_checkpoint_needs_its_siglip_config(tmp_path, capsys):
    args = ["--checkpoint", str(OFFICIAL_2R / "official.safetensors"), "--tokenizer", str(QWEN_TINY)]
    assert convert_main([*args, "--output", str(tmp_path / "out")]) == 1
    assert "is a Tuna-R checkpoint (it has SigLIP weights): give the SigLIP config" in capsys.readouterr().err
    wrong = SiglipVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, patch_size=16)
    wrong.save_pretrained(tmp_path / "wrong")
    assert convert_main([*args, "--output", str(tmp_path / "out"), "--siglip-config", str(tmp_path / "wrong")]) == 1
    assert "has width 64 but the SigLIP config says 32" in capsys.readouterr().err


def test_a_tuna_r_checkpoint_with_missing_or_extra_siglip_weights_is_refused(tmp_path, official_2r_state_dict, capsys):
    """The converter's strict rule: a SigLIP weight missing, and the final LayerNorm the official model does not have,
    are both listed, and nothing is written."""
    state_dict = dict(official_2r_state_dict)
    del state_dict["vision_model.encoder.layers.1.mlp.fc2.bias"]
    state_dict["vision_model.post_layernorm.weight"] = torch.ones(64)
    checkpoint = tmp_path / "broken.safetensors"
    save_file(state_dict, checkpoint)
    args = ["--checkpoint", str(checkpoint), "--tokenizer", str(QWEN_TINY), "--output", str(tmp_path / "out")]
    assert convert_main([*args, "--siglip-config", str(SIGLIP_TINY_CONFIG)]) == 1
    error = capsys.readouterr().err
    assert "missing (1):\n    vision_model.encoder.layers.1.mlp.fc2.bias" in error
    assert "unexpected (1):\n    vision_model.post_layernorm.weight" in error
    assert not (tmp_path / "out").exists()


def make_siglip_folder(folder: Path, with_text_model: bool) -> SiglipVisionModel:
    """A random SigLIP vision model of the fixture's tiny shape (3 layers, a 96-pixel position table), with a pooling
    head and final LayerNorm, as a SigLIP checkpoint has them; saved alone, or inside a whole SigLIP (text model too),
    as SigLIP2 is published."""
    torch.manual_seed(2)
    vision_config = SiglipVisionConfig.from_pretrained(SIGLIP_TINY_CONFIG)
    if not with_text_model:
        siglip = SiglipVisionModel(vision_config).eval()
        siglip.save_pretrained(folder)
        return siglip
    text_config = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    whole = SiglipModel(SiglipConfig(text_config=text_config, vision_config=vision_config.to_dict())).eval()
    whole.save_pretrained(folder)
    siglip = SiglipVisionModel(whole.config.vision_config).eval()
    siglip.load_state_dict(whole.vision_model.state_dict())
    return siglip


@pytest.mark.parametrize("with_text_model", [False, True], ids=["vision-model", "whole-siglip"])
def test_init_a_tuna_r_from_qwen2_and_siglip(tmp_path, with_text_model):
    """`tuna2 init --siglip`: the LLM and SigLIP weights as they are (the kept layers), the position table resampled
    to the new size, the projector as officially initialised, no mask token."""
    torch.manual_seed(1)
    qwen = Qwen2ForCausalLM(Qwen2Config.from_pretrained(QWEN_TINY, vocab_size=652)).eval()
    qwen.save_pretrained(tmp_path / "qwen")
    for path in QWEN_TINY.iterdir():
        if path.suffix != ".json" or "token" in path.name:
            shutil.copy(path, tmp_path / "qwen")
    siglip = make_siglip_folder(tmp_path / "siglip", with_text_model)
    output = tmp_path / "tuna-r"
    args = ["--qwen", str(tmp_path / "qwen"), "--siglip", str(tmp_path / "siglip"), "--output", str(output)]
    assert init_main([*args, "--siglip-image-size", "64", "--flow-head-layers", "1"]) == 0
    pipeline = Tuna2Pipeline.from_pretrained(output)
    model = pipeline.model
    assert pipeline.config.sampling_method == "heun" and json.loads((output / "model_index.json").read_text())
    assert model.config.vision_config.image_size == 64 and model.model.mask_token is None
    tower = model.model.vision_tower.state_dict()
    pretrained = siglip.state_dict()
    assert len([key for key in tower if key.endswith("layer_norm1.weight")]) == 2
    for key, tensor in tower.items():
        if key != "embeddings.position_embedding.weight":
            assert torch.equal(tensor, pretrained[key]), key
    with torch.no_grad():
        resampled = siglip.embeddings.interpolate_pos_encoding(torch.zeros(1, 16, 64), 64, 64)[0]
    assert torch.equal(tower["embeddings.position_embedding.weight"], resampled)
    projector = model.model.multi_modal_projector
    assert torch.equal(projector.norm.weight, torch.ones(64))
    for linear in projector.linear_1, projector.linear_2:  # PyTorch's default, as the official projector starts
        bound = linear.in_features**-0.5
        assert linear.weight.abs().max() <= bound and abs(linear.weight.std() / (bound / 3**0.5) - 1) < 0.1
        assert linear.bias.abs().max() <= bound and linear.bias.any()
    ids = torch.tensor([[641, 80, 81, 82, 642]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, qwen(ids).logits, atol=1e-6, rtol=0)


def test_tuna_r_7b_config_is_the_official_one():
    config = Tuna2Config.tuna_r_7b()
    vision = config.vision_config
    assert (vision.hidden_size, vision.intermediate_size, vision.num_attention_heads) == (1152, 4304, 16)
    assert (vision.image_size, vision.patch_size, config.num_vision_layers) == (512, 16, 26)
    assert config.text_config.hidden_size == 3584 and config.flow_head_num_layers == 16 and not config.use_mask_token


def test_tuna_r_7b_weight_memory_row():
    """benchmarks/memory_7b.py's Tuna-R rows (docs/benchmarks.md): Tuna-2 7B without its patch embedding and mask
    token, with 26 SigLIP2 so400m layers at a 32x32 position table and the projector, counted here by hand."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        import memory_7b
    finally:
        sys.path.pop(0)
    rows = {(row["model"], row["mode"]): row for row in memory_7b.memory_rows()}
    tuna_2 = rows["Tuna-2 7B", "full (generation + understanding), bf16"]
    tuna_r = rows["Tuna-R 7B", "full (generation + understanding), bf16"]
    width, mlp, llm = 1152, 4304, 3584
    siglip_layer = 2 * 2 * width + 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width)
    siglip = (width * 3 * 16 * 16 + width) + 32 * 32 * width + 26 * siglip_layer
    projector = width + (width * llm + llm) + (llm * llm + llm)
    tuna_2_only = (llm * 3 * 16 * 16 + llm) + llm + llm  # patch conv, its RMSNorm, the mask token
    assert tuna_r["parameters_stored"] == tuna_2["parameters_stored"] - tuna_2_only + siglip + projector
    assert tuna_r["parameters_stored"] == 13_076_646_432
    position_ids = 32 * 32 * 8  # int64
    expected_bytes = tuna_2["weight_bytes"] + 2 * (siglip + projector - tuna_2_only) + position_ids
    assert tuna_r["weight_bytes"] == expected_bytes
    understanding = rows["Tuna-R 7B", "understanding only, bf16"]
    assert understanding["parameters_stored"] == tuna_r["parameters_stored"] - tuna_r["flow_head_parameters"]


def test_the_tuna2_command_serves_a_tuna_r_folder(tmp_path, pipe, capsys):
    """`tuna2 generate`, `edit` and `ask` on a saved Tuna-R pipeline: the folder's sampling defaults (heun), or
    `--sampler`, and the same image as the pipeline's."""
    from diffusers_tuna2.cli import main

    pipe.save_pretrained(tmp_path / "tuna-r")
    model = str(tmp_path / "tuna-r")
    heun, euler = tmp_path / "heun.png", tmp_path / "euler.png"
    options = ["--model", model, "--steps", "2", "--size", "32x32"]
    assert main(["generate", "a red circle", "-o", str(heun), *options]) == 0
    options += ["--sampler", "euler"]
    assert main(["generate", "a red circle", "-o", str(euler), *options]) == 0
    seed = torch.Generator().manual_seed(0)
    (expected,) = pipe("a red circle", height=32, width=32, num_inference_steps=2, generator=seed).images
    assert np.abs(np.asarray(PIL.Image.open(heun), dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    assert not np.array_equal(np.asarray(PIL.Image.open(heun)), np.asarray(PIL.Image.open(euler)))
    assert main(["edit", str(heun), "make it blue", "-o", str(tmp_path / "edited.png"), *options]) == 0
    capsys.readouterr()
    assert main(["ask", str(heun), "What colour?", "--model", model, "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_the_app_serves_tuna_r_with_its_own_defaults(pipe, tmp_path):
    """The web app's tabs run a Tuna-R pipeline as they run Tuna-2's: its sampling defaults (Heun, guidance 4 / 5)
    fill the settings, and the Heun sampler reports one progress step per denoising step (not per model call)."""
    import gradio as gr

    from diffusers_tuna2.app import Tasks, sampling_settings

    with gr.Blocks():
        guidance = [sampling_settings(pipe, editing)[4].value for editing in (False, True)]
    assert guidance == [4.0, 5.0]
    progress = []

    def record(step, **kwargs):
        progress.append(step)

    gallery = Tasks(pipe).generate("a red circle", "", 32, 48, 3, 4.0, 7, 2, progress=record)
    assert [caption for _, caption in gallery] == ["seed 7", "seed 8"]
    assert [image.size for image, _ in gallery] == [(48, 32)] * 2
    assert progress == [(1, 3), (2, 3), (3, 3)]
    source = tmp_path / "source.png"
    PIL.Image.new("RGB", (32, 32), (200, 40, 40)).save(source)
    edited = Tasks(pipe).edit(str(source), "make it blue", "", 32, 32, 2, 5.0, 0, progress=record)
    assert edited.size == (32, 32) and progress[-2:] == [(1, 2), (2, 2)]
