"""Restoring a "foundation" checkpoint (some layers re-initialised by the official team): `tuna2 convert --report
--fresh-layers-out` finds the re-initialised layers, `examples/sft.py --train-only-file ... --ema-decay` trains them
and nothing else, and saves the EMA of the trained weights."""

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from training_data import write_dataset
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from diffusers_tuna2 import Tuna2Pipeline
from diffusers_tuna2.conversion import convert_main
from transformers_tuna2 import Tuna2ForConditionalGeneration
from transformers_tuna2.convert_tuna2_weights_to_hf import WeightStatistics, hf_to_official_key
from transformers_tuna2.modeling_tuna2 import Tuna2ZeroInitLinear
from tuna2_training.data import Tuna2Collator, read_jsonl
from tuna2_training.ema import ExponentialMovingAverage
from tuna2_training.tiny import build_processor, randomize_, tiny_config, tiny_model
from tuna2_training.train_only import freeze_all_but, modules_to_save, parameter_selector, read_patterns_file
from tuna2_training.trainer import Tuna2SFTTrainer, lora_target_modules

ROOT = Path(__file__).parents[1]
QWEN_TINY = Path(__file__).parent / "fixtures" / "conversion" / "qwen_tiny"
LLM_LAYER, FLOW_LAYER = "model.language_model.layers.1.", "flow_head.layers.1."


# ---------------------------------------------------------------------------------------------------- helpers


@torch.no_grad()
def reinitialise_llm_layer_(model: Tuna2ForConditionalGeneration, index: int):
    """transformers' initialisation of a Qwen2 decoder layer: linears N(0, initializer_range), zero biases, norms 1."""
    std = model.config.text_config.initializer_range
    for module in model.model.language_model.layers[index].modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Qwen2RMSNorm):
            nn.init.ones_(module.weight)


@torch.no_grad()
def reinitialise_flow_block_(model: Tuna2ForConditionalGeneration, index: int):
    """The official initialisation of a flow-head block (`init_tuna2_from_qwen2`): PyTorch's default linears,
    adaLN-Zero, norms 1."""
    for module in model.flow_head.layers[index].modules():
        if isinstance(module, Tuna2ZeroInitLinear):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            module.reset_parameters()
        elif isinstance(module, Qwen2RMSNorm):
            nn.init.ones_(module.weight)


def foundation_of(model: Tuna2ForConditionalGeneration, llm_layer: int, flow_layer: int):
    """A copy of a trained model with one LLM layer and one flow-head block re-initialised the official way."""
    foundation = Tuna2ForConditionalGeneration(model.config)
    foundation.load_state_dict(model.state_dict())
    torch.manual_seed(123)
    reinitialise_llm_layer_(foundation, llm_layer)
    reinitialise_flow_block_(foundation, flow_layer)
    return foundation.eval()


def official_checkpoint(model, path: Path) -> Path:
    save_file({hf_to_official_key(k): v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def load_sft_script():
    spec = importlib.util.spec_from_file_location("sft_script", ROOT / "examples" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


# ---------------------------------------------------------------------------------------------------- detection


@pytest.fixture(scope="module")
def official_config():
    """A tiny Tuna-2 on the official fixture's Qwen2 config, 4 LLM layers and 4 flow-head blocks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(OFFICIAL / "tokenizer_tuna")
    text_config = dict(json.loads((QWEN_TINY / "config.json").read_text()), vocab_size=len(tokenizer))
    text_config["num_hidden_layers"] = 4
    for key in ("architectures", "model_type", "torch_dtype", "transformers_version"):
        text_config.pop(key)
    return tiny_config(tokenizer, text_config=text_config, flow_head_num_layers=4)


def convert_with_report(capsys, model, config, folder: Path, *options) -> tuple[list[str], str]:
    """Runs `tuna2 convert --fresh-layers-out` on the model as an official checkpoint; returns the layers the file
    names (the lines that are not comments) and what the command printed."""
    folder.mkdir(exist_ok=True)
    config.text_config.to_json_file(folder / "base_config.json")
    checkpoint = official_checkpoint(model, folder / "foundation.safetensors")
    capsys.readouterr()
    exit_code = convert_main(
        [
            *("--checkpoint", str(checkpoint), "--tokenizer", str(QWEN_TINY), "--output", str(folder / "out")),
            *("--base-config", str(folder / "base_config.json"), "--fresh-layers-out", str(folder / "fresh.txt")),
            *options,
        ]
    )
    printed = capsys.readouterr().out
    assert exit_code == 0, printed
    lines = (folder / "fresh.txt").read_text().splitlines()
    return [line for line in lines if not line.startswith("#")], printed


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_report_finds_exactly_the_reinitialised_layers(tmp_path, capsys, official_config, dtype):
    trained = randomize_(Tuna2ForConditionalGeneration(official_config), seed=1)
    foundation = foundation_of(trained, llm_layer=2, flow_layer=1)
    fresh, printed = convert_with_report(
        capsys, foundation, official_config, tmp_path, *(["--dtype", dtype] if dtype else [])
    )
    assert fresh == ["model.language_model.layers.2.", "flow_head.layers.1."]
    assert read_patterns_file(tmp_path / "fresh.txt") == fresh  # what sft.py --train-only-file reads
    assert "2 layer(s) look freshly initialised" in printed
    assert "  model.language_model.layers.2.  (7 normal(0, 0.02), 3 zeros, 2 ones)" in printed
    assert "  flow_head.layers.1.  (7 kaiming-uniform, 4 ones, 2 zeros)" in printed
    assert "Wrote the 2 freshly initialised layer(s) to" in printed


def test_report_marks_no_layer_of_a_trained_model_and_every_layer_of_a_new_one(tmp_path, capsys, official_config):
    trained = randomize_(Tuna2ForConditionalGeneration(official_config), seed=2)
    with torch.no_grad():  # single re-initialised tensors do not make a fresh layer
        trained.model.language_model.layers[3].input_layernorm.weight.fill_(1.0)
        trained.flow_head.layers[2].adaLN_modulation[1].weight.zero_()
    fresh, printed = convert_with_report(capsys, trained, official_config, tmp_path / "trained")
    assert fresh == [] and "No layer looks freshly initialised" in printed
    with pytest.raises(ValueError, match="names no parameters"):  # sft.py refuses to train nothing
        read_patterns_file(tmp_path / "trained" / "fresh.txt")

    torch.manual_seed(0)
    new = Tuna2ForConditionalGeneration(official_config)  # every layer as transformers initialises it
    fresh, _ = convert_with_report(capsys, new, official_config, tmp_path / "new")
    assert fresh == [
        *(f"model.language_model.layers.{i}." for i in range(4)),
        *(f"flow_head.layers.{i}." for i in range(4)),
        "flow_head.final_layer.",
    ]


def test_initialisation_rule_on_statistics():
    statistics_ = WeightStatistics()
    generator = torch.Generator().manual_seed(0)
    fan_in = 512
    bound = 1 / math.sqrt(fan_in)
    statistics_.add("gaussian.weight", torch.randn(256, fan_in, generator=generator) * 0.02)
    statistics_.add("uniform.weight", (torch.rand(256, fan_in, generator=generator) * 2 - 1) * bound)
    statistics_.add("trained.weight", torch.randn(256, fan_in, generator=generator) * 0.023)  # 15% off: not an init
    statistics_.add("offset.weight", torch.randn(256, fan_in, generator=generator) * 0.02 + 0.001)  # mean off 0
    statistics_.add("unbounded.weight", torch.randn(256, fan_in, generator=generator) * bound / math.sqrt(3))
    statistics_.add("layer.input_layernorm.weight", torch.ones(64))
    statistics_.add("layer.input_layernorm2.weight", torch.full((64,), 1.01))
    statistics_.add("layer.adaLN_modulation.1.weight", torch.zeros(64, 16))
    statistics_.add("layer.norm.weight", torch.zeros(64))  # a zero norm weight is no initialisation
    assert statistics_.initialisation("gaussian.weight") == "normal(0, 0.02)"
    assert statistics_.initialisation("uniform.weight") == "kaiming-uniform"
    assert statistics_.initialisation("trained.weight") is None
    assert statistics_.initialisation("offset.weight") is None
    assert statistics_.initialisation("unbounded.weight") is None  # the std of kaiming, but not bounded
    assert statistics_.initialisation("layer.input_layernorm.weight") == "ones"
    assert statistics_.initialisation("layer.input_layernorm2.weight") is None
    assert statistics_.initialisation("layer.adaLN_modulation.1.weight") == "zeros"
    assert statistics_.initialisation("layer.norm.weight") is None


# ---------------------------------------------------------------------------------------------------- selection


def test_patterns_are_prefixes_or_whole_name_regexes(tmp_path):
    select = parameter_selector(["model.language_model.layers.1.", r"flow_head\.layers\.[23]\..*_proj\.weight"])
    assert select("model.language_model.layers.1.mlp.up_proj.weight")
    assert not select("model.language_model.layers.10.mlp.up_proj.weight")  # a prefix, not a regex prefix
    assert not select("model.language_model.layers.11.mlp.up_proj.weight")
    assert select("flow_head.layers.3.self_attn.q_proj.weight")
    assert not select("flow_head.layers.3.input_layernorm.weight")
    assert not select("xflow_head.layers.3.self_attn.q_proj.weight")
    path = tmp_path / "layers.txt"
    path.write_text("# comment\n\nmodel.language_model.layers.1.  # trailing comment\nflow_head.layers.1.\n")
    assert read_patterns_file(path) == ["model.language_model.layers.1.", "flow_head.layers.1."]


def test_unknown_pattern_and_partial_modules_fail_clearly(tokenizer):
    model = tiny_model(tokenizer)
    with pytest.raises(ValueError, match=r"no parameter of the model matches \['flow_head.layers.7.'\]"):
        freeze_all_but(model, [LLM_LAYER, "flow_head.layers.7."])
    with pytest.raises(ValueError, match="selects whole modules"):
        modules_to_save(model, [r"flow_head\.layers\.1\.adaLN_modulation\.1\.weight"])


def test_lora_with_train_only_trains_the_named_modules_fully_and_adapters_elsewhere(tokenizer):
    model = tiny_model(tokenizer)
    modules = modules_to_save(model, [FLOW_LAYER])
    assert "flow_head.layers.1.self_attn.q_proj" in modules and "flow_head.layers.1.input_layernorm" in modules
    config = LoraConfig(
        r=4, target_modules=lora_target_modules("all"), exclude_modules=modules, modules_to_save=modules
    )
    layer_tensors = len(list(model.flow_head.layers[1].parameters()))
    peft_model = get_peft_model(model, config)
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    in_layer = [name for name in trainable if ".flow_head.layers.1." in name]
    outside = [name for name in trainable if ".flow_head.layers.1." not in name]
    assert in_layer and all("modules_to_save" in name and "lora_" not in name for name in in_layer)
    assert len(in_layer) == layer_tensors
    assert outside and all("lora_" in name for name in outside)
    assert any("flow_head.layers.0." in name for name in outside) and any("language_model" in n for n in outside)


# ---------------------------------------------------------------------------------------------------- EMA


def test_ema_matches_a_hand_computation():
    weight = nn.Parameter(torch.tensor([1.0, 2.0]))
    frozen = nn.Parameter(torch.tensor([7.0]), requires_grad=False)
    ema = ExponentialMovingAverage([("w", weight), ("f", frozen)], decay=0.9)
    assert list(ema.state_dict()) == ["w"]
    with torch.no_grad():
        weight.copy_(torch.tensor([3.0, 4.0]))
    ema.update()  # 0.9 * [1, 2] + 0.1 * [3, 4]
    torch.testing.assert_close(ema.state_dict()["w"], torch.tensor([1.2, 2.2]), rtol=0, atol=1e-6)
    with torch.no_grad():
        weight.copy_(torch.tensor([5.0, 0.0]))
    ema.update()  # 0.9 * [1.2, 2.2] + 0.1 * [5, 0]
    torch.testing.assert_close(ema.state_dict()["w"], torch.tensor([1.58, 1.98]), rtol=0, atol=1e-6)

    warm = ExponentialMovingAverage([("w", nn.Parameter(torch.tensor([1.0, 2.0])))], decay=0.9999, warmup=True)
    assert [warm.current_decay()] == [0.1]
    with torch.no_grad():
        warm.parameters[0][1].copy_(torch.tensor([3.0, 4.0]))
    warm.update()  # decay 1/10: 0.1 * [1, 2] + 0.9 * [3, 4]
    with torch.no_grad():
        warm.parameters[0][1].copy_(torch.tensor([5.0, 0.0]))
    assert warm.current_decay() == pytest.approx(2 / 11)
    warm.update()  # decay 2/11
    expected = torch.tensor([2.8, 3.8]) * 2 / 11 + torch.tensor([5.0, 0.0]) * 9 / 11
    torch.testing.assert_close(warm.state_dict()["w"], expected, rtol=0, atol=1e-6)


def test_ema_of_bfloat16_weights_is_kept_in_float32_and_swaps_back_exactly():
    weight = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    ema = ExponentialMovingAverage([("w", weight)], decay=0.9999)
    with torch.no_grad():
        weight.fill_(2.0)
    ema.update()  # 1.0001: lost in bfloat16, kept in float32
    assert ema.state_dict()["w"].dtype == torch.float32
    torch.testing.assert_close(ema.state_dict()["w"], torch.full((4,), 1.0001), rtol=0, atol=1e-6)
    raw = weight.detach().clone()
    with ema.swapped_in():
        assert torch.equal(weight, torch.full((4,), 1.0001).to(torch.bfloat16))
    assert torch.equal(weight, raw)


# ---------------------------------------------------------------------------------------------------- restoring


class RecordingTrainer(Tuna2SFTTrainer):
    """The script's trainer, kept for the test to look at its raw weights and EMA."""

    instances = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingTrainer.instances.append(self)


def mean_loss(model, batch, seeds=range(4)) -> float:
    """The training loss over a few seeds (training mode: the model draws the times and noise of the batch)."""
    losses = []
    model.train()
    with torch.no_grad():
        for seed in seeds:
            torch.manual_seed(seed)
            losses.append(model(**batch).loss.item())
    model.eval()
    return statistics.mean(losses)


def test_training_only_the_fresh_layers_restores_them_and_saves_the_ema(tmp_path, tokenizer, monkeypatch):
    processor = build_processor(tokenizer, size={"height": 32, "width": 32})
    original = tiny_model(tokenizer, output_layout="patch")
    foundation = foundation_of(original, llm_layer=1, flow_layer=1)
    foundation.save_pretrained(tmp_path / "foundation")
    processor.save_pretrained(tmp_path / "foundation")
    data = write_dataset(tmp_path / "data")
    fresh_file = tmp_path / "fresh.txt"
    fresh_file.write_text(f"# from tuna2 convert --fresh-layers-out\n{LLM_LAYER}\n{FLOW_LAYER}\n")

    sft = load_sft_script()
    monkeypatch.setattr(sft, "Tuna2SFTTrainer", RecordingTrainer)
    RecordingTrainer.instances.clear()
    sft.main(
        [
            *("--model", str(tmp_path / "foundation"), "--output", str(tmp_path / "out")),
            *("--data", *(f"{task}={path}" for task, path in data.items())),
            *("--no-lora", "--train-only-file", str(fresh_file), "--ema-decay", "0.8"),
            *("--max-steps", "30", "--batch-size", "4", "--image-size", "32", "--learning-rate", "2e-3"),
            *("--weight-decay", "0", "--logging-steps", "10", "--save-steps", "1000"),
        ]
    )
    (trainer,) = RecordingTrainer.instances
    trained_names = {name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad}
    assert trained_names == {
        name for name, _ in foundation.named_parameters() if name.startswith((LLM_LAYER, FLOW_LAYER))
    }

    saved = weights_of(tmp_path / "out")
    before = foundation.state_dict()
    raw = trainer.model.state_dict()
    ema = trainer.ema.state_dict()
    assert set(saved) == set(before) and set(ema) == trained_names
    for name, tensor in before.items():
        if name in trained_names:
            assert torch.equal(saved[name], ema[name]), name  # what is saved is the EMA ...
            assert not torch.equal(saved[name], raw[name]), name  # ... not the raw weights
            assert not torch.equal(saved[name], tensor), name
        else:  # every other tensor stays bit for bit as loaded, in the raw weights and in the saved EMA
            assert torch.equal(saved[name], tensor), name
            assert torch.equal(raw[name], tensor), name

    # The restored layers lower the loss on the data they were trained on.
    restored = Tuna2ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    collator = Tuna2Collator(processor, image_size=32)
    samples = [s for task, path in data.items() for s in read_jsonl(path, task)]
    batch = collator([{"sample": s, "images": s.load_images()} for s in samples])
    loss_before, loss_after = mean_loss(foundation, batch), mean_loss(restored, batch)
    print(f"loss of the foundation {loss_before:.4f}, restored {loss_after:.4f}")
    assert loss_after < 0.8 * loss_before

    # The saved folder is a pipeline folder: the EMA weights generate.
    pipe = Tuna2Pipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(
        pipe.model.state_dict()[f"{FLOW_LAYER}mlp.up_proj.weight"], ema[f"{FLOW_LAYER}mlp.up_proj.weight"]
    )
    latent = pipe(
        "a red circle",
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert latent.shape == (1, 3, 32, 32) and torch.isfinite(latent).all()


def test_lora_with_train_only_saves_the_ema_of_the_adapters_and_of_the_named_layers(tmp_path, tokenizer, monkeypatch):
    processor = build_processor(tokenizer, size={"height": 32, "width": 32})
    tiny_model(tokenizer).save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    data = write_dataset(tmp_path / "data")
    sft = load_sft_script()
    monkeypatch.setattr(sft, "Tuna2SFTTrainer", RecordingTrainer)
    RecordingTrainer.instances.clear()
    sft.main(
        [
            *("--model", str(tmp_path / "model"), "--output", str(tmp_path / "out")),
            *("--data", *(f"{task}={path}" for task, path in data.items())),
            *("--train-only", FLOW_LAYER, "--ema-decay", "0.5", "--lora-r", "4"),
            *("--max-steps", "3", "--batch-size", "2", "--image-size", "32", "--learning-rate", "1e-2"),
        ]
    )
    (trainer,) = RecordingTrainer.instances
    ema, raw = trainer.ema.state_dict(), dict(trainer.model.named_parameters())
    assert any(".flow_head.layers.1." in name and "modules_to_save" in name for name in ema)
    assert not any(".flow_head.layers.1." in name and "lora_" in name for name in ema)
    assert any("lora_B" in name for name in ema)
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for name, average in ema.items():
        key = name.replace(".modules_to_save.default.", ".").replace(".default.", ".")
        assert torch.equal(saved[key], average), name
        assert not torch.equal(saved[key], raw[name].detach()), name
    # The diffusers LoRA format holds LoRA layers only: the fully trained layers stay in the PEFT folder alone.
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
