"""The converters of transformers_tuna2 (official checkpoints, new models from Qwen2), and `tuna2 convert` and
`tuna2 init` (diffusers_tuna2.conversion), which add the pipeline's files: the shared folder.

Parity goes through the converter and the folder it writes: the official fixture weights, converted, must give what
the official implementation computed (tests/fixtures/official)."""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import OFFICIAL
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

import transformers_tuna2.convert_tuna2_weights_to_hf as converter
import transformers_tuna2.init_tuna2_from_qwen2 as initializer
from diffusers_tuna2 import Tuna2Pipeline
from diffusers_tuna2.conversion import convert_main, init_main
from transformers_tuna2 import Tuna2Config, Tuna2ForConditionalGeneration, Tuna2Processor
from transformers_tuna2.convert_tuna2_weights_to_hf import hf_to_official_key
from tuna2_training.tiny import randomize_, tiny_config

QWEN_TINY = Path(__file__).parent / "fixtures" / "conversion" / "qwen_tiny"
CASES = json.loads((OFFICIAL / "cases.json").read_text())
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def wrap_training_checkpoint(state_dict):
    return {"model": {"tuna_model." + k: v for k, v in state_dict.items()}, "step": 7, "optimizer": {"state": {}}}


# The layouts official checkpoints come in: as saved by the inference code, by the training callback, under DDP, and
# under FSDP with torch.compile.
CHECKPOINT_LAYOUTS = {
    "raw.pt": lambda state_dict: state_dict,
    "training.pt": wrap_training_checkpoint,
    "ddp.bin": lambda state_dict: {"module.tuna_model." + k: v for k, v in state_dict.items()},
    "fsdp.pth": lambda state_dict: {
        "state_dict": {"_fsdp_wrapped_module._orig_mod." + k: v for k, v in state_dict.items()}
    },
}


@pytest.fixture(scope="module")
def official_state_dict():
    return load_file(OFFICIAL / "official.safetensors")


def write_checkpoint(folder: Path, name: str, state_dict) -> Path:
    path = folder / name
    if name.endswith(".safetensors"):
        save_file(state_dict, path)
    else:
        torch.save(state_dict, path)
    return path


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def weight_file_names(folder: Path) -> list[str]:
    return sorted(path.name for pattern in WEIGHT_FILES for path in folder.glob(pattern))


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in folder.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def converted_folder(tmp_path_factory, official_state_dict):
    """The official fixture weights as a raw .pt file, converted by the command line."""
    folder = tmp_path_factory.mktemp("converted")
    checkpoint = write_checkpoint(folder, "raw.pt", official_state_dict)
    converter.main(["--checkpoint", str(checkpoint), "--tokenizer", str(QWEN_TINY), "--output", str(folder / "tuna2")])
    return folder / "tuna2"


@pytest.fixture(scope="module")
def converted_model(converted_folder):
    return AutoModelForImageTextToText.from_pretrained(converted_folder).eval()


@pytest.fixture(scope="module")
def converted_pipeline(converted_folder):
    pipeline = Tuna2Pipeline.from_pretrained(converted_folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ---------------------------------------------------------------------------------------------------- parity


def test_converted_weights_are_the_official_ones(converted_model, official_model):
    """`official_model` carries the official weights by key mapping and matches the official outputs
    (test_official_parity.py); the converted model holds the very same tensors."""
    converted, official = converted_model.state_dict(), official_model.state_dict()
    assert set(converted) == set(official)
    for name, tensor in official.items():
        assert torch.equal(converted[name], tensor), name


def test_converted_understanding_matches_official(converted_folder, converted_model, official_reference):
    ids = official_reference["mmu_64x64.input_ids"]
    pixels = official_reference["mmu_64x64.pixel_values"]
    with torch.no_grad():
        logits = converted_model(input_ids=ids, pixel_values=pixels).logits
        # The folder's generation config: greedy, as the official evaluation decodes.
        out = converted_model.generate(
            input_ids=ids,
            pixel_values=pixels,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            output_logits=True,
            return_dict_in_generate=True,
        )
    torch.testing.assert_close(logits, official_reference["mmu_64x64.prefill_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(out.logits), official_reference["mmu_64x64.step_logits"], atol=1e-4, rtol=0)
    assert out.sequences[0, ids.shape[1] :].tolist() == official_reference["mmu_64x64.output_ids"].tolist()


@pytest.mark.parametrize("case", ["t2i_64x64", "t2i_64x96", "edit_64x64"])
def test_converted_pipeline_samples_the_official_image(converted_pipeline, official_reference, case):
    settings = CASES[case]
    kwargs = dict(
        height=settings["height"],
        width=settings["width"],
        negative_prompt=settings["negative_prompt"],
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
    )
    if case == "edit_64x64":
        # The official edit pipeline draws other random numbers before its initial noise: its z_0 is given.
        kwargs["image"] = PIL.Image.fromarray(official_reference["edit_64x64.source_uint8"].numpy())
        kwargs["latents"] = official_reference["edit_64x64.z_init"][:, :, 0]
    prompt = settings.get("prompt", settings.get("instruction"))
    z, images = (
        converted_pipeline(
            prompt, generator=torch.Generator().manual_seed(settings["seed"]), output_type=output_type, **kwargs
        ).images
        for output_type in ("latent", "np")
    )
    torch.testing.assert_close(z, official_reference[f"{case}.z_final"][:, :, 0], atol=5e-5, rtol=0)
    expected = official_reference[f"{case}.image_uint8"].numpy().astype(int)
    assert np.abs(images.astype(int) - expected).max() <= 1


# ---------------------------------------------------------------------------------------------------- the folder


def test_converted_tokenizer_is_the_official_one(converted_folder, official_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(converted_folder)
    assert len(tokenizer) == len(official_tokenizer) == 652
    assert tokenizer.get_vocab() == official_tokenizer.get_vocab()
    assert tokenizer.pad_token == "[PAD]"
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "<image>", "<|vid_start|>", "<|vid_end|>"]) == [
        648,
        649,
        650,
        651,
    ]
    text = "<|im_start|>a red <image> cube<|vid_start|>[PAD]<|im_end|>"
    assert tokenizer(text).input_ids == official_tokenizer(text).input_ids
    # Setting up an already set-up tokenizer changes nothing.
    assert converter.load_official_tokenizer(OFFICIAL / "tokenizer_tuna").get_vocab() == official_tokenizer.get_vocab()


def test_converted_config_processor_and_generation_config(converted_folder, converted_model):
    config = converted_model.config
    assert config.output_layout == "raster" and config.use_mask_token
    assert (config.patch_size, config.num_channels, config.timestep_frequency_dim) == (16, 3, 256)
    assert (config.flow_head_num_layers, config.flow_head_num_attention_heads) == (2, 2)
    assert (config.flow_head_num_key_value_heads, config.flow_head_head_dim) == (1, 64)
    assert (config.image_token_id, config.vision_start_token_id, config.vision_end_token_id) == (646, 643, 644)
    assert config.text_config.vocab_size == 652 and config.text_config.eos_token_id == 642
    generation = converted_model.generation_config
    assert (generation.do_sample, generation.eos_token_id, generation.pad_token_id) == (False, 642, 648)
    assert generation.max_new_tokens == 512
    processor = AutoProcessor.from_pretrained(converted_folder)
    assert isinstance(processor, Tuna2Processor) and processor.image_processor.resolution == "512"


def test_mask_token_is_kept_when_present_and_dropped_from_the_config_when_absent(
    tmp_path, official_state_dict, converted_model
):
    assert torch.equal(converted_model.model.mask_token, official_state_dict["mask_token"])
    without = {k: v for k, v in official_state_dict.items() if k != "mask_token"}
    converter.convert(write_checkpoint(tmp_path, "inference.pt", without), QWEN_TINY, tmp_path / "out")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert not model.config.use_mask_token and model.model.mask_token is None


def test_padded_vocabulary_is_kept_with_a_warning(tmp_path, official_state_dict, converted_model, caplog):
    padded = dict(official_state_dict)
    for key in ("tuna.model.embed_tokens.weight", "tuna.lm_head.weight"):
        padded[key] = torch.cat([padded[key], torch.zeros(52, 128)])
    converter.convert(write_checkpoint(tmp_path, "padded.pt", padded), QWEN_TINY, tmp_path / "out")
    assert "the embeddings have 704 rows for 652 tokens; the extra rows are never used" in caplog.text
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[641, 257, 75, 270, 642]])
    with torch.no_grad():
        logits, expected = model(input_ids=ids).logits, converted_model(input_ids=ids).logits
    assert logits.shape[-1] == 704
    torch.testing.assert_close(logits[..., :652], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", [*CHECKPOINT_LAYOUTS, "official.safetensors"])
def test_every_checkpoint_layout_converts_to_the_same_folder(tmp_path, official_state_dict, converted_folder, layout):
    if layout == "official.safetensors":
        checkpoint = shutil.copy(OFFICIAL / "official.safetensors", tmp_path / layout)
    else:
        checkpoint = write_checkpoint(tmp_path, layout, CHECKPOINT_LAYOUTS[layout](official_state_dict))
    converter.convert(checkpoint, QWEN_TINY, tmp_path / "out")
    assert files_of(tmp_path / "out") == files_of(converted_folder)


def test_sharded_bfloat16_folder_holds_one_copy_of_the_weights(tmp_path, official_state_dict, converted_folder):
    output = tmp_path / "bf16"
    convert_main(
        [
            *("--checkpoint", str(shutil.copy(OFFICIAL / "official.safetensors", tmp_path))),
            *("--tokenizer", str(QWEN_TINY), "--output", str(output)),
            *("--dtype", "bfloat16", "--max-shard-size", "600KB"),
        ]
    )
    shards = sorted(output.glob("*.safetensors"))
    assert len(shards) > 2 and weight_file_names(output) == [path.name for path in shards]
    index = json.loads((output / "model.safetensors.index.json").read_text())
    names_per_shard = []
    for shard in shards:
        with safe_open(shard, framework="pt") as handle:
            names_per_shard += [(name, shard.name) for name in handle.keys()]
    assert dict(names_per_shard) == index["weight_map"] and len(names_per_shard) == len(index["weight_map"])
    model = AutoModelForImageTextToText.from_pretrained(output)
    assert set(index["weight_map"]) == set(model.state_dict())
    parameter_bytes = sum(2 * tensor.numel() for tensor in model.state_dict().values())
    assert index["metadata"]["total_size"] == parameter_bytes
    assert sum(path.stat().st_size for path in shards) < 1.05 * parameter_bytes  # one copy, plus small headers

    assert (
        model.config.dtype == torch.bfloat16
        and json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    )
    for name, tensor in weights_of(output).items():
        assert torch.equal(tensor, official_state_dict[hf_to_official_key(name)].to(torch.bfloat16)), name

    # Loaded and saved again by the pipeline, the folder has the same files (the weights apart) with the same content.
    resaved = tmp_path / "resaved"
    Tuna2Pipeline.from_pretrained(output).save_pretrained(resaved, max_shard_size="600KB")
    assert {k: v for k, v in files_of(resaved).items() if ".safetensors" not in k} == {
        k: v for k, v in files_of(output).items() if ".safetensors" not in k
    }
    assert files_of(resaved).keys() == files_of(output).keys()


# ---------------------------------------------------------------------------------------------------- bad input


def test_missing_unexpected_and_misshaped_keys_are_all_listed(tmp_path, official_state_dict):
    state_dict = dict(official_state_dict)
    del state_dict["diffusion_head_a.1.mlp.up_proj.weight"]
    state_dict["diffusion_head_a.1.mlp.extra_proj.weight"] = torch.zeros(4, 128)
    state_dict["vae.decoder.weight"] = torch.zeros(3)
    state_dict["time_embed.mlp.2.bias"] = torch.zeros(127)
    checkpoint = write_checkpoint(tmp_path, "broken.pt", wrap_training_checkpoint(state_dict))
    with pytest.raises(ValueError) as error:
        converter.convert(checkpoint, QWEN_TINY, tmp_path / "out")
    message = str(error.value)
    assert "missing (1):\n    diffusion_head_a.1.mlp.up_proj.weight" in message
    assert "unexpected (2):" in message
    assert (
        "tuna_model.diffusion_head_a.1.mlp.extra_proj.weight" in message and "tuna_model.vae.decoder.weight" in message
    )
    assert "wrong shape (1):\n    tuna_model.time_embed.mlp.2.bias: [127] in the checkpoint, [128] expected" in message
    assert not (tmp_path / "out").exists()


def write_text(folder):
    path = folder / "notes.pt"
    path.write_text("not a checkpoint")
    return path


def write_text_safetensors(folder):
    path = folder / "notes.safetensors"
    path.write_text("not a checkpoint")
    return path


def write_list(folder):
    return write_checkpoint(folder, "list.pt", [torch.zeros(2)])


def write_step_only(folder):
    return write_checkpoint(folder, "step.pt", {"model": {"step": 3}})


def write_unknown_suffix(folder):
    return write_checkpoint(folder, "weights.ckpt", {"a": torch.zeros(2)})


def write_llm_only(folder):
    state_dict = load_file(OFFICIAL / "official.safetensors")
    return write_checkpoint(folder, "qwen.pt", {k: v for k, v in state_dict.items() if k.startswith("tuna.")})


def write_duplicates(folder):
    state_dict = load_file(OFFICIAL / "official.safetensors")
    return write_checkpoint(folder, "twice.pt", {**state_dict, "module.mask_token": state_dict["mask_token"]})


@pytest.mark.parametrize(
    "write, message",
    [
        (write_text, "is not a checkpoint in torch.save's zip format"),
        (write_text_safetensors, "is not a safetensors file"),
        (write_list, "holds a list, not a state dict"),
        (write_step_only, r"is not a state dict of tensors; entries that are not tensors: \['step'\]"),
        (write_unknown_suffix, "unsupported file type '.ckpt'"),
        (write_llm_only, r"cannot read a Tuna-2 configuration off .* it lacks \['vision_encoder.patch_embedding"),
        (write_duplicates, "'module.mask_token' and 'mask_token' are the same weight"),
    ],
)
def test_what_is_not_an_official_checkpoint_fails_clearly(tmp_path, write, message):
    with pytest.raises(ValueError, match=message):
        converter.convert(write(tmp_path), QWEN_TINY, tmp_path / "out")


def base_folder(folder: Path, tokenizer=None, with_config: bool = True) -> Path:
    """A base-LLM folder: the tiny tokenizer (or `tokenizer`) and, unless `with_config` is False, its Qwen2 config."""
    folder.mkdir()
    if with_config:
        shutil.copy(QWEN_TINY / "config.json", folder)
    (tokenizer or AutoTokenizer.from_pretrained(QWEN_TINY)).save_pretrained(folder)
    return folder


def test_base_config_problems_fail_clearly(tmp_path):
    checkpoint = OFFICIAL / "official.safetensors"
    no_config = base_folder(tmp_path / "tokenizer_only", with_config=False)
    with pytest.raises(ValueError, match="has no config.json; give the base LLM's Qwen2 config with --base-config"):
        converter.convert(checkpoint, no_config, tmp_path / "out")
    wider = Qwen2Config.from_pretrained(QWEN_TINY, hidden_size=256)
    wider.to_json_file(tmp_path / "wider.json")
    with pytest.raises(ValueError, match="hidden size 128 but the base config says 256"):
        converter.convert(checkpoint, no_config, tmp_path / "out", base_config=tmp_path / "wider.json")
    Qwen2Config.from_pretrained(QWEN_TINY, tie_word_embeddings=True).to_json_file(tmp_path / "tied.json")
    with pytest.raises(ValueError, match="ties the input and output embeddings"):
        converter.convert(checkpoint, no_config, tmp_path / "out", base_config=tmp_path / "tied.json")
    # The right config given explicitly works.
    converter.convert(checkpoint, no_config, tmp_path / "out", base_config=QWEN_TINY / "config.json")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_tokenizer_and_output_problems_fail_clearly(tmp_path):
    checkpoint = OFFICIAL / "official.safetensors"
    larger = converter.load_official_tokenizer(QWEN_TINY)
    larger.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="the tokenizer has 653 entries after the official setup but the embeddings"):
        converter.convert(checkpoint, base_folder(tmp_path / "larger", larger), tmp_path / "out")
    base = AutoTokenizer.from_pretrained(QWEN_TINY)
    base.eos_token = "<|endoftext|>"
    with pytest.raises(ValueError, match="eos token is '<\\|endoftext\\|>', not '<\\|im_end\\|>'"):
        converter.convert(checkpoint, base_folder(tmp_path / "base_eos", base), tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "old.txt").write_text("")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        converter.convert(checkpoint, QWEN_TINY, tmp_path / "busy")


# ---------------------------------------------------------------------------------------------------- --report


def test_report_flags_reinitialised_layers(tmp_path, official_tokenizer):
    text_config = dict(
        json.loads((QWEN_TINY / "config.json").read_text()), vocab_size=len(official_tokenizer), num_hidden_layers=4
    )
    for key in ("architectures", "model_type", "torch_dtype", "transformers_version"):
        text_config.pop(key)
    config = tiny_config(official_tokenizer, text_config=text_config, flow_head_num_layers=4)
    model = randomize_(Tuna2ForConditionalGeneration(config))
    with torch.no_grad():
        model.model.language_model.layers[2].input_layernorm.weight.fill_(1.0)
        model.flow_head.layers[1].self_attn.q_proj.weight.mul_(5.0)
    config.text_config.to_json_file(tmp_path / "base_config.json")
    state_dict = {hf_to_official_key(k): v.contiguous() for k, v in model.state_dict().items()}
    checkpoint = write_checkpoint(tmp_path, "foundation.safetensors", state_dict)
    _, statistics = converter.convert(
        checkpoint, QWEN_TINY, tmp_path / "out", base_config=tmp_path / "base_config.json", report=True
    )
    flags = statistics.flags()
    assert set(flags) == {
        "model.language_model.layers.2.input_layernorm.weight",
        "flow_head.layers.1.self_attn.q_proj.weight",
    }
    assert flags["model.language_model.layers.2.input_layernorm.weight"] == ["constant 1"]
    (outlier,) = flags["flow_head.layers.1.self_attn.q_proj.weight"]
    assert 4.5 < float(re.fullmatch(r"std (\S+)x the median of its 4 layers", outlier).group(1)) < 5.5
    report = statistics.format()
    assert re.search(r"flow_head\.layers\.1\.self_attn\.q_proj\.weight +\[128, 128\] .* std \S+x the median", report)
    assert report.endswith(f"2 of {len(model.state_dict())} weights flagged")


# ---------------------------------------------------------------------------------------------------- init_from_qwen2


def make_qwen_folder(folder: Path, vocab_size: int) -> Qwen2ForCausalLM:
    """A random Qwen2ForCausalLM with the tiny Qwen2.5-style tokenizer, saved as a Qwen2.5 folder."""
    torch.manual_seed(1)
    qwen = Qwen2ForCausalLM(Qwen2Config.from_pretrained(QWEN_TINY, vocab_size=vocab_size)).eval()
    qwen.save_pretrained(folder)
    for path in QWEN_TINY.iterdir():
        if path.suffix != ".json" or "token" in path.name:
            shutil.copy(path, folder)
    return qwen


@pytest.mark.parametrize("qwen_vocab_size", [648, 700])  # the official resize grows (tiny) or truncates (7B)
def test_init_from_qwen2_keeps_the_language_model(tmp_path, qwen_vocab_size):
    qwen = make_qwen_folder(tmp_path / "qwen", qwen_vocab_size)
    initializer.main(
        ["--qwen", str(tmp_path / "qwen"), "--output", str(tmp_path / "tuna2"), "--flow-head-layers", "2"]
    )
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "tuna2").eval()
    assert model.config.text_config.vocab_size == 652 and model.config.output_layout == "patch"

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tuna2")
    ids = tokenizer("<|im_start|>user\nWhat colour is the square?<|im_end|>", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, logits = qwen(ids).logits, model(input_ids=ids).logits
    shared_rows = min(qwen_vocab_size, 652)
    torch.testing.assert_close(logits[..., :shared_rows], expected[..., :shared_rows], atol=1e-6, rtol=0)
    for ours, theirs in (
        (model.model.language_model.embed_tokens, qwen.model.embed_tokens),
        (model.lm_head, qwen.lm_head),
    ):
        assert torch.equal(ours.weight[:shared_rows], theirs.weight[:shared_rows])
        if qwen_vocab_size < 652:  # grown rows are drawn from the distribution of the others, not left at zero
            assert ours.weight[shared_rows:].abs().min() > 0


def test_init_from_qwen2_initialises_the_new_parts_as_the_official_code(tmp_path):
    make_qwen_folder(tmp_path / "qwen", 648)
    model, _ = initializer.init_from_qwen2(tmp_path / "qwen", output_layout="raster", flow_head_layers=4)
    assert model.config.output_layout == "raster" and model.dtype == torch.float32
    hidden_size = 128
    patch_conv = model.model.patch_embed.patch_embedding
    xavier_bound = math.sqrt(6 / (3 * 256 + hidden_size * 256))  # torch's fans of a (D, C, p, p) convolution
    assert patch_conv.weight.abs().max() <= xavier_bound and not patch_conv.bias.any()
    assert abs(patch_conv.weight.std() / (xavier_bound / math.sqrt(3)) - 1) < 0.05
    for linear in model.model.time_embed.mlp[0], model.model.time_embed.mlp[2]:
        assert abs(linear.weight.std() / 0.02 - 1) < 0.1
        assert linear.bias.abs().max() <= linear.in_features**-0.5 and linear.bias.any()  # PyTorch's default
    for block in model.flow_head.layers:
        assert not block.adaLN_modulation[1].weight.any() and not block.adaLN_modulation[1].bias.any()
        # The official flow-head init never runs: its linears keep PyTorch's kaiming-uniform default.
        for linear in (block.self_attn.q_proj, block.self_attn.k_proj, block.mlp.gate_proj, block.mlp.down_proj):
            bound = linear.in_features**-0.5
            assert linear.weight.abs().max() <= bound and abs(linear.weight.std() / (bound / math.sqrt(3)) - 1) < 0.1
    final_layer = model.flow_head.final_layer
    for tensor in (final_layer.linear.weight, final_layer.linear.bias, *final_layer.adaLN_modulation[1].parameters()):
        assert not tensor.any()
    norms = [param for name, param in model.named_parameters() if "norm" in name and "language_model" not in name]
    assert len(norms) == 1 + 4 * 4 + 1 and all(torch.equal(norm, torch.ones_like(norm)) for norm in norms)
    assert abs(model.model.mask_token.std() * math.sqrt(hidden_size) - 1) < 0.25
    # With the final layer at zero, the first x0 prediction is zero.
    ids = torch.tensor([[641, 643, *[646] * 5, 644, 642]])
    with torch.no_grad():
        x0 = model(ids, torch.randn(1, 3, 32, 32), timesteps=torch.tensor([0.5]), image_roles=torch.tensor([2])).x0
    assert x0.shape == (1, 3, 32, 32) and not x0.any()


def test_init_from_qwen2_writes_a_folder_for_both_libraries_in_the_qwen_dtype(tmp_path):
    qwen = make_qwen_folder(tmp_path / "qwen", 648)
    qwen.to(torch.bfloat16).save_pretrained(tmp_path / "qwen")
    init_main(["--qwen", str(tmp_path / "qwen"), "--output", str(tmp_path / "tuna2"), "--flow-head-layers", "1"])
    pipeline = Tuna2Pipeline.from_pretrained(tmp_path / "tuna2")
    assert pipeline.model.dtype == torch.bfloat16 and isinstance(pipeline.processor, Tuna2Processor)
    assert pipeline.model.generation_config.eos_token_id == 642 and not pipeline.model.generation_config.do_sample
    assert weight_file_names(tmp_path / "tuna2") == ["model.safetensors"]
    assert (tmp_path / "tuna2" / "model_index.json").is_file() and (tmp_path / "tuna2" / "scheduler").is_dir()


def test_new_flow_head_from_qwen25_7b_is_the_official_one():
    official = Tuna2Config.tuna2_7b()
    shape = initializer.flow_head_shape(hidden_size=3584, intermediate_size=18944, num_layers=16)
    assert shape == {key: getattr(official, key) for key in shape}


CONVERT_UNDER_ADDRESS_LIMIT = """
import resource, sys
import transformers_tuna2.convert_tuna2_weights_to_hf as converter
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
limit = size + int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
converter.convert(sys.argv[1], sys.argv[2], sys.argv[3], max_shard_size="20MB")
"""


def test_a_checkpoint_larger_than_the_memory_the_converter_may_map_converts(tmp_path, official_state_dict):
    """A training checkpoint whose file is larger than the address space the converter has left (its optimizer state
    makes it 400 MB; the 7B checkpoint is 25 GB on a 24 GB machine, which the kernel will not map copy-on-write as
    `torch.load(mmap=True)` does): the converter reads only the model's tensors, one at a time."""
    import subprocess
    import sys

    state_dict = official_state_dict
    optimizer = {"state": {0: {"exp_avg": torch.zeros(100 * 2**20)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    checkpoint = write_checkpoint(tmp_path, "step_1.pt", {"model": state_dict, "step": 1, "optimizer": optimizer})
    assert checkpoint.stat().st_size > 400 * 2**20
    output = tmp_path / "out"
    command = [sys.executable, "-c", CONVERT_UNDER_ADDRESS_LIMIT, str(checkpoint), str(QWEN_TINY), str(output)]
    done = subprocess.run(command + [str(200 * 2**20)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert weights_of(output).keys() == {converter.official_to_hf_key(key) for key in state_dict}
