import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from transformers_tuna2 import Tuna2ForConditionalGeneration
from transformers_tuna2.convert_tuna2_weights_to_hf import official_to_hf_key
from tuna2_training.tiny import build_processor, build_tokenizer, tiny_config, tiny_model

OFFICIAL = Path(__file__).parent / "fixtures" / "official"
OFFICIAL_2R = Path(__file__).parent / "fixtures" / "official_2r"
SHAPES_EXAMPLE = Path(__file__).parents[1] / "examples" / "shapes"
SFT_EXAMPLE = Path(__file__).parents[1] / "examples" / "sft.py"


def import_shapes_example(name: str):
    """A module of examples/shapes (a folder of scripts, not a package), imported by name."""
    sys.path.insert(0, str(SHAPES_EXAMPLE))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SHAPES_EXAMPLE))


def import_sft():
    """examples/sft.py (a script, not a package), imported as a module."""
    spec = importlib.util.spec_from_file_location("tuna2_sft_example", SFT_EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shapes():
    """The demo's scenes, texts and pixel analyser."""
    return import_shapes_example("shapes")


@pytest.fixture(scope="session")
def shapes_evaluation():
    """The demo's evaluation: cases, interfaces (libraries, command line), scores and floor."""
    return import_shapes_example("evaluate")


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def processor(tokenizer):
    return build_processor(tokenizer, size={"height": 32, "width": 48})


@pytest.fixture(scope="session")
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer):
    """A tiny pipeline folder (32x32 processor) for the `tuna2` command tests."""
    from diffusers_tuna2 import Tuna2Pipeline

    path = tmp_path_factory.mktemp("ckpt")
    Tuna2Pipeline(
        model=tiny_model(tokenizer), processor=build_processor(tokenizer, size={"height": 32, "width": 32})
    ).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def official_reference():
    return load_file(OFFICIAL / "reference_subset.safetensors")


@pytest.fixture(scope="session")
def official_tokenizer():
    return AutoTokenizer.from_pretrained(OFFICIAL / "tokenizer_tuna")


@pytest.fixture(scope="session")
def official_model(official_tokenizer):
    """Our model carrying the official fixture weights (official key names mapped to ours)."""
    config = tiny_config(official_tokenizer, text_config=official_tiny_text_config(official_tokenizer))
    model = Tuna2ForConditionalGeneration(config).eval()
    official = load_file(OFFICIAL / "official.safetensors")
    model.load_state_dict({official_to_hf_key(key): value for key, value in official.items()}, strict=True)
    return model


def official_tiny_text_config(tokenizer) -> dict:
    """The Qwen2 config of the official references' tiny LLM, with the vocabulary of their tokenizer."""
    text_config = json.loads((OFFICIAL / "qwen_tiny_config.json").read_text())
    for key in ("architectures", "model_type", "torch_dtype", "transformers_version"):
        text_config.pop(key, None)
    text_config["vocab_size"] = len(tokenizer)
    return text_config


@pytest.fixture(scope="session")
def official_2r_reference():
    return load_file(OFFICIAL_2R / "reference_subset.safetensors")


@pytest.fixture(scope="session")
def official_2r_model(official_tokenizer):
    """Our Tuna-R carrying the official Tuna-R fixture weights (official key names mapped to ours). The tokenizer and
    the LLM are the Tuna-2 reference's; the SigLIP config is the official file's with its position table at 64 pixels
    (4x4 patches) and the second-to-last of its 3 layers read, as the official model was built."""
    vision_config = json.loads((OFFICIAL_2R / "siglip_tiny_config.json").read_text())
    vision_config.pop("architectures")
    vision_config["image_size"] = 64
    config = tiny_config(
        official_tokenizer,
        text_config=official_tiny_text_config(official_tokenizer),
        vision_config=vision_config,
        vision_feature_layer=-2,
        use_mask_token=False,
    )
    model = Tuna2ForConditionalGeneration(config).eval()
    official = load_file(OFFICIAL_2R / "official.safetensors")
    model.load_state_dict({official_to_hf_key(key): value for key, value in official.items()}, strict=True)
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
