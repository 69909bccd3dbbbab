"""LoRAs in diffusers' format: `examples/sft.py` writes `pytorch_lora_weights.safetensors` beside the PEFT adapter, and
`Tuna2Pipeline` loads, stacks (`set_adapters`), fuses and unloads them as diffusers pipelines do."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import import_sft
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from training_data import write_dataset

from diffusers_tuna2 import Tuna2Pipeline
from tuna2_training.tiny import build_processor, tiny_model
from tuna2_training.trainer import lora_target_modules

GENERATE = dict(
    prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="latent", negative_prompt="blurry"
)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("base")
    tiny_model(tokenizer).save_pretrained(folder)
    build_processor(tokenizer, size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, base_folder):
    """A 2-step LoRA run of examples/sft.py (in process) on the tiny model; returns its output folder and the trained
    model as it was in memory at the end of training."""
    sft = import_sft()
    data = write_dataset(tmp_path_factory.mktemp("data"))
    output = tmp_path_factory.mktemp("sft") / "lora"
    trained = {}
    save = sft.save

    def keep_trained_model(trainer, processor, args):
        trained["model"] = trainer.model
        save(trainer, processor, args)

    sft.save = keep_trained_model
    sft.main(
        [
            "--model",
            str(base_folder),
            "--data",
            f"t2i={data['t2i']}",
            "--output",
            str(output),
            "--lora-r",
            "4",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--image-size",
            "32",
            "--learning-rate",
            "1e-2",
            "--logging-steps",
            "1",
            "--save-steps",
            "100",
        ]
    )
    return output, trained["model"].eval()


def base_pipeline(base_folder) -> Tuna2Pipeline:
    pipe = Tuna2Pipeline.from_pretrained(base_folder)
    pipe.model.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> torch.Tensor:
    return pipe(generator=torch.Generator().manual_seed(0), **GENERATE).images


def random_lora(base_folder, folder: Path, targets: str, rank: int, seed: int) -> Path:
    """A second LoRA with random A and B (so that it changes the images), saved with `save_lora_weights`."""
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=lora_target_modules(targets), init_lora_weights=False)
    peft_model = get_peft_model(Tuna2Pipeline.from_pretrained(base_folder).model, config)
    Tuna2Pipeline.save_lora_weights(folder, model_lora_layers=peft_model)
    return folder


def test_sft_lora_in_diffusers_format_reproduces_the_trained_model(sft_run, base_folder):
    output, trained = sft_run
    assert (output / LORA_WEIGHT_NAME_SAFE).is_file() and (output / "adapter_config.json").is_file()
    reference = Tuna2Pipeline(model=trained.get_base_model(), processor=base_pipeline(base_folder).processor)
    reference.set_progress_bar_config(disable=True)
    expected = generate(reference)

    pipe = base_pipeline(base_folder)
    base = generate(pipe)
    pipe.load_lora_weights(output / LORA_WEIGHT_NAME_SAFE, adapter_name="trained")
    assert pipe.get_list_adapters() == {"model": ["trained"]}
    with_lora = generate(pipe)
    torch.testing.assert_close(with_lora, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_lora, base, atol=1e-3)
    pipe.unload_lora_weights()
    assert not hasattr(pipe.model, "peft_config")
    torch.testing.assert_close(generate(pipe), base, rtol=0, atol=0)


def test_set_adapters_with_weights(sft_run, base_folder, tmp_path):
    output, _ = sft_run
    second = random_lora(base_folder, tmp_path / "second", targets="llm", rank=2, seed=1)
    pipe = base_pipeline(base_folder)
    pipe.load_lora_weights(output, adapter_name="first")  # the folder: its diffusers file wins over the PEFT files
    first_alone = generate(pipe)
    pipe.load_lora_weights(second, adapter_name="second")
    assert pipe.get_list_adapters() == {"model": ["first", "second"]}
    pipe.set_adapters("second")
    second_alone = generate(pipe)
    assert not torch.allclose(second_alone, first_alone, atol=1e-3)
    only_second = base_pipeline(base_folder)
    only_second.load_lora_weights(second / LORA_WEIGHT_NAME_SAFE)
    torch.testing.assert_close(second_alone, generate(only_second), rtol=1e-6, atol=1e-6)

    pipe.set_adapters(["first", "second"], adapter_weights=[1.0, 0.0])
    assert pipe.get_active_adapters() == ["first", "second"]
    torch.testing.assert_close(generate(pipe), first_alone, rtol=1e-6, atol=1e-6)
    pipe.set_adapters(["first", "second"], adapter_weights=[1.0, 0.5])
    both = generate(pipe)
    assert not torch.allclose(both, first_alone, atol=1e-3) and not torch.allclose(both, second_alone, atol=1e-3)

    pipe.delete_adapters("second")
    assert pipe.get_list_adapters() == {"model": ["first"]}
    pipe.set_adapters("first")
    torch.testing.assert_close(generate(pipe), first_alone, rtol=1e-6, atol=1e-6)


def test_fuse_and_unfuse(sft_run, base_folder):
    output, _ = sft_run
    pipe = base_pipeline(base_folder)
    base = generate(pipe)
    base_weights = {name: tensor.clone() for name, tensor in pipe.model.state_dict().items()}
    pipe.load_lora_weights(output)
    with_adapter = generate(pipe)
    pipe.fuse_lora()
    assert pipe.num_fused_loras == 1
    torch.testing.assert_close(generate(pipe), with_adapter, rtol=1e-4, atol=1e-4)
    pipe.unfuse_lora()
    assert pipe.num_fused_loras == 0
    # unfused, the base weights are back, under the adapter's layers
    for name, tensor in pipe.model.state_dict().items():
        if ".lora_" not in name:
            torch.testing.assert_close(tensor, base_weights[name.replace(".base_layer", "")], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(generate(pipe), with_adapter, rtol=1e-5, atol=1e-5)
    pipe.disable_lora()
    torch.testing.assert_close(generate(pipe), base, rtol=1e-4, atol=1e-4)
    pipe.enable_lora()
    torch.testing.assert_close(generate(pipe), with_adapter, rtol=1e-4, atol=1e-4)
    pipe.unload_lora_weights()
    torch.testing.assert_close(generate(pipe), base, rtol=1e-4, atol=1e-4)
    for name, tensor in pipe.model.state_dict().items():
        torch.testing.assert_close(tensor, base_weights[name], rtol=1e-5, atol=1e-5, msg=name)


def test_unknown_keys_are_refused(sft_run, base_folder, tmp_path):
    output, _ = sft_run
    with safe_open(output / LORA_WEIGHT_NAME_SAFE, "pt") as file:
        state_dict = {key: file.get_tensor(key) for key in file.keys()}
        metadata = file.metadata()
    key = next(iter(state_dict))
    bad = {
        **state_dict,
        "model.model.no_such_block.q_proj.lora_A.weight": state_dict[key].clone(),
        "transformer.blocks.0.lora_B.weight": state_dict[key].clone(),
    }
    save_file(bad, tmp_path / LORA_WEIGHT_NAME_SAFE, metadata=metadata)
    pipe = base_pipeline(base_folder)
    with pytest.raises(ValueError) as error:
        pipe.load_lora_weights(tmp_path)
    message = str(error.value)
    assert "\n" not in message and "match no module of the model" in message
    assert "model.model.no_such_block.q_proj.lora_A.weight" in message
    assert "transformer.blocks.0.lora_B.weight" in message
    assert not hasattr(pipe.model, "peft_config")  # nothing was injected


def test_file_layout_is_diffusers_and_peft_folders_still_load(sft_run, base_folder, tmp_path):
    output, trained = sft_run
    with safe_open(output / LORA_WEIGHT_NAME_SAFE, "pt") as file:
        keys, metadata = list(file.keys()), file.metadata()
    assert LORA_WEIGHT_NAME_SAFE == "pytorch_lora_weights.safetensors"
    assert all(key.startswith(f"{Tuna2Pipeline.model_name}.") and ".lora_" in key for key in keys)
    assert "model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert any(".flow_head." in key for key in keys)
    # As diffusers' `LoraBaseMixin.write_lora_layers` writes it: the format, and the config under its key, each
    # entry prefixed with the component's name.
    assert metadata["format"] == "pt"
    config = json.loads(metadata[LORA_ADAPTER_METADATA_KEY])
    assert config["model.r"] == 4 and config["model.lora_alpha"] == 8
    assert config["model.target_modules"] == lora_target_modules("all")
    # diffusers reads it back with its own reader, into the `LoraConfig` the adapter was trained with
    state_dict, read_metadata = Tuna2Pipeline.lora_state_dict(output, return_lora_metadata=True)
    assert sorted(state_dict) == sorted(keys) and read_metadata == config

    # The same adapter written from the model that carries it (a `PeftModel`) is the same file.
    Tuna2Pipeline.save_lora_weights(tmp_path / "again", model_lora_layers=trained)
    again, again_metadata = Tuna2Pipeline.lora_state_dict(tmp_path / "again", return_lora_metadata=True)
    assert again.keys() == state_dict.keys() and all(torch.equal(again[k], state_dict[k]) for k in state_dict)
    assert {k: again_metadata[k] for k in ("model.r", "model.lora_alpha", "model.target_modules")} == {
        k: config[k] for k in ("model.r", "model.lora_alpha", "model.target_modules")
    }

    peft_only = tmp_path / "peft"
    peft_only.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(output / name, peft_only / name)
    assert Tuna2Pipeline.is_peft_adapter(peft_only) and not Tuna2Pipeline.is_peft_adapter(output)
    from_file, from_peft = base_pipeline(base_folder), base_pipeline(base_folder)
    from_file.load_lora_weights(output)
    from_peft.load_lora_weights(peft_only, adapter_name="peft")
    assert from_peft.get_list_adapters() == {"model": ["peft"]}
    torch.testing.assert_close(generate(from_peft), generate(from_file), rtol=0, atol=0)


def test_loading_a_lora_without_peft_says_so(monkeypatch, tokenizer):
    pipe = Tuna2Pipeline(model=tiny_model(tokenizer), processor=build_processor(tokenizer))
    monkeypatch.setattr("diffusers_tuna2.lora_tuna2.is_peft_available", lambda: False)
    with pytest.raises(ValueError, match=r"^loading a LoRA needs PEFT: pip install peft"):
        pipe.load_lora_weights("some/folder")


@pytest.mark.parametrize("module", ["diffusers_tuna2.lora_tuna2", "diffusers_tuna2.pipeline_tuna2"])
def test_loaders_use_only_public_names_of_diffusers_and_peft(module):
    """Private helpers of diffusers change without notice between releases (the package has no upper bound)."""
    import ast
    import importlib

    tree = ast.parse(Path(importlib.import_module(module).__file__).read_text())
    private = [
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("diffusers", "peft")
        for alias in node.names
        if alias.name.startswith("_") or any(part.startswith("_") for part in node.module.split("."))
    ]
    assert private == []


def test_a_lora_without_metadata_gets_its_ranks_from_the_weights(base_folder, tmp_path):
    """Without the config in the file's metadata, the ranks are read from the weights, a rank per module when they
    differ (`rank_pattern`), with `lora_alpha = r` as diffusers assumes."""
    torch.manual_seed(3)
    targets = lora_target_modules("llm")
    config = LoraConfig(
        r=2, lora_alpha=2, target_modules=targets, rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 4},
        init_lora_weights=False,
    )  # fmt: skip
    peft_model = get_peft_model(Tuna2Pipeline.from_pretrained(base_folder).model, config)
    Tuna2Pipeline.save_lora_weights(tmp_path / "with", model_lora_layers=peft_model)
    state_dict = Tuna2Pipeline.lora_state_dict(tmp_path / "with")
    save_file(state_dict, tmp_path / "bare.safetensors")  # no metadata
    with_metadata, bare = base_pipeline(base_folder), base_pipeline(base_folder)
    with_metadata.load_lora_weights(tmp_path / "with")
    bare.load_lora_weights(tmp_path / "bare.safetensors")
    assert bare.model.peft_config["default_0"].rank_pattern  # the q_proj ranks differ from the others
    torch.testing.assert_close(generate(bare), generate(with_metadata), rtol=0, atol=0)
    assert not torch.allclose(generate(bare), generate(base_pipeline(base_folder)), atol=1e-3)


def test_loading_a_lora_under_group_offloading_says_to_load_it_first(base_folder, sft_run):
    from diffusers.hooks import apply_group_offloading

    output, _ = sft_run
    pipe = base_pipeline(base_folder)
    apply_group_offloading(pipe.model, onload_device=torch.device("cpu"), offload_type="leaf_level")
    with pytest.raises(ValueError, match="^load LoRAs before enabling group offloading"):
        pipe.load_lora_weights(output)
    assert not hasattr(pipe.model, "peft_config")
