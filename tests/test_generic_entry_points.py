"""`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` on a Tuna-2 folder saved with its pipeline code
(`save_pretrained(..., save_pipeline_code=True)`): diffusers finds the pipeline class in the module file that
`model_index.json`'s `_class_name` names, as for its custom pipelines, and the copy imports the model's code saved
beside the weights, so that the folder loads where only diffusers and transformers are installed."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import diffusers_tuna2
from diffusers_tuna2 import Tuna2Pipeline
from tuna2_training.tiny import build_processor, tiny_model, tiny_tuna_r_model

PACKAGES = {"diffusers_tuna2", "transformers_tuna2", "tuna2_training", "tuna2_eval"}
GENERATE = dict(prompt="a red circle", num_inference_steps=2, output_type="np")
DEMO = Path(diffusers_tuna2.demo_model_path())


def images(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(0), **GENERATE).images


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("with_code")
    processor = build_processor(tokenizer, size={"height": 32, "width": 32})
    Tuna2Pipeline(model=tiny_model(tokenizer), processor=processor).save_pretrained(path, save_pipeline_code=True)
    return path


@pytest.fixture(scope="module")
def tuna_r_folder(tmp_path_factory, tokenizer):
    """A tiny Tuna-R, whose folder's code must carry its sampler (Heun) and decoding (min-max) too."""
    path = tmp_path_factory.mktemp("tuna_r_with_code")
    processor = build_processor(tokenizer, size={"height": 32, "width": 32})
    pipeline = Tuna2Pipeline(model=tiny_tuna_r_model(tokenizer), processor=processor)
    pipeline.save_pretrained(path, save_pipeline_code=True)
    return path


@pytest.fixture(scope="module")
def demo_with_code(tmp_path_factory):
    """The shipped demo saved with the whole code, as a folder that no longer needs the package."""
    path = tmp_path_factory.mktemp("demo_with_code")
    Tuna2Pipeline.from_pretrained(DEMO).save_pretrained(path, save_pipeline_code=True)
    return path


@pytest.fixture(params=["saved", "demo", "tuna-r"])
def path(request, folder, tuna_r_folder):
    return {"saved": folder, "demo": DEMO, "tuna-r": tuna_r_folder}[request.param]


@pytest.fixture(params=["saved", "demo", "tuna-r"])
def path_with_code(request, folder, demo_with_code, tuna_r_folder):
    return {"saved": folder, "demo": demo_with_code, "tuna-r": tuna_r_folder}[request.param]


def test_the_folder_names_its_pipeline_module_which_needs_no_package(path_with_code):
    index = json.loads((path_with_code / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_tuna2", "Tuna2Pipeline"]
    code = "\n".join(file.read_text() for file in path_with_code.glob("*.py"))
    assert re.findall(r"^\s*(?:from|import) (?:diffusers|transformers)_tuna2", code, flags=re.MULTILINE) == []


def test_diffusion_pipeline_loads_the_pipeline_of_the_folder(path):
    generic = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
    assert type(generic).__name__ == "Tuna2Pipeline"
    assert type(generic.model).__name__ == "Tuna2ForConditionalGeneration"
    specific = Tuna2Pipeline.from_pretrained(path)  # the class itself: the folder's code does not run
    assert type(specific) is Tuna2Pipeline
    assert np.array_equal(images(generic), images(specific))


def test_without_trust_remote_code_diffusers_asks_for_it(folder):
    with pytest.raises(ValueError, match="Pass `trust_remote_code=True`"):
        DiffusionPipeline.from_pretrained(folder)


def test_a_default_save_keeps_the_plain_class_name(tmp_path, folder):
    Tuna2Pipeline.from_pretrained(folder).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "Tuna2Pipeline"
    assert not (tmp_path / "pipeline_tuna2.py").exists()


def test_saving_the_pipeline_code_writes_the_models_code(tmp_path):
    """Without `transformers_tuna2.register_for_auto_class()`, the model and processor save no code; the pipeline's
    code needs theirs and writes it."""
    Tuna2Pipeline.save_pipeline_code(tmp_path)
    assert {
        "configuration_tuna2.py",
        "modeling_tuna2.py",
        "processing_tuna2.py",
        "image_processing_tuna2.py",
        "flow_matching.py",
        "image_utils.py",
        "pipeline_tuna2.py",
    } <= {file.name for file in tmp_path.glob("*.py")}


def test_the_demo_names_the_packages_pipeline():
    """The demo ships inside the package: its pipeline module is the package's, not a copy that could go stale."""
    assert json.loads((DEMO / "model_index.json").read_text())["_class_name"] == ["pipeline_tuna2", "Tuna2Pipeline"]
    assert [file.name for file in DEMO.glob("*.py")] == ["pipeline_tuna2.py"]
    assert DiffusionPipeline.from_pretrained(DEMO, trust_remote_code=True).__class__ is Tuna2Pipeline


def test_loads_where_the_package_is_not_installed(tmp_path, path_with_code):
    path = path_with_code
    np.save(tmp_path / "expected.npy", images(Tuna2Pipeline.from_pretrained(path)))
    script = textwrap.dedent(
        f"""
        import sys


        class NotInstalled:  # this project's packages are missing, however they are installed (editable or not)
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {PACKAGES!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}")


        sys.meta_path.insert(0, NotInstalled())
        for package in ("diffusers_tuna2", "transformers_tuna2"):
            try:
                __import__(package)
                raise SystemExit(f"{{package}} is importable")
            except ImportError:
                pass
        import numpy as np
        import torch
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained({str(path)!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(generator=torch.Generator().manual_seed(0), **{GENERATE!r}).images
        assert np.array_equal(images, np.load({str(tmp_path / "expected.npy")!r})), "images differ"
        print("loaded", type(pipe).__module__)
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "loaded diffusers_modules.local.pipeline_tuna2" in result.stdout


def test_the_readme_example_runs_as_written():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = next(
        block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "demo_model_path()" in block
        and "DiffusionPipeline.from_pretrained" in block
    )  # fmt: skip
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert type(namespace["pipe"]).__name__ == "Tuna2Pipeline" and namespace["image"].size == (48, 48)
