"""The layout of the packages: data flows one way, processor -> model -> pipeline / trainer.

Inference (`transformers_tuna2`, `diffusers_tuna2`) imports nothing of training (TRL, PEFT, datasets), `tuna2_training`
loads TRL only with its trainer, and `transformers_tuna2`, its converters included, never imports diffusers. Imports
are checked in fresh interpreters, on the source tree these tests import."""

import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import OFFICIAL

import transformers_tuna2
from diffusers_tuna2.conversion import convert_main
from transformers_tuna2.convert_tuna2_weights_to_hf import main as convert_weights_main

SOURCE = Path(transformers_tuna2.__file__).parents[1]
QWEN_TINY = Path(__file__).parent / "fixtures" / "conversion" / "qwen_tiny"
TRAINING_LIBRARIES = {"trl", "peft", "datasets"}
DIFFUSERS = {"diffusers", "diffusers_tuna2"}


def imported(*steps: str) -> list[set[str]]:
    """Runs `steps` (Python code) one after the other in a fresh interpreter; returns the top-level packages in
    `sys.modules` after each step."""
    report = "print(__import__('json').dumps(sorted({name.partition('.')[0] for name in __import__('sys').modules})))"
    script = "\n".join(f"{step}\n{report}" for step in steps)
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [set(json.loads(line)) for line in result.stdout.splitlines()[-len(steps) :]]


def test_inference_imports_no_training_library():
    packages, pipeline = imported(
        "import transformers_tuna2, diffusers_tuna2",
        "import transformers_tuna2.modeling_tuna2, diffusers_tuna2.pipeline_tuna2\ndiffusers_tuna2.Tuna2Pipeline",
    )
    assert packages & (TRAINING_LIBRARIES | {"diffusers"}) == set()  # diffusers_tuna2 imports diffusers when used
    assert "diffusers" in pipeline and pipeline & {"trl", "datasets", "tuna2_training"} == set()
    # diffusers itself imports PEFT when it is installed (diffusers.hooks.layerwise_casting, with no switch to turn it
    # off): the pipeline may bring in what diffusers brings in, nothing more...
    (diffusers_alone,) = imported("import transformers\nfrom diffusers import DiffusionPipeline")
    assert (pipeline & TRAINING_LIBRARIES) - diffusers_alone == set()
    # ...and it does not need PEFT: hidden from diffusers and from our code (as when it is not installed), it imports.
    (without_peft,) = imported(
        "import sys\nsys.modules['peft'] = None\n"  # None in sys.modules: `import peft` fails, find_spec says absent
        "import transformers_tuna2.modeling_tuna2, diffusers_tuna2.pipeline_tuna2\ndiffusers_tuna2.Tuna2Pipeline"
    )
    assert "diffusers" in without_peft and without_peft & {"trl", "datasets"} == set()


def test_transformers_package_imports_no_diffusers():
    modules = [module.name for module in pkgutil.iter_modules(transformers_tuna2.__path__, "transformers_tuna2.")]
    converters = {"transformers_tuna2.convert_tuna2_weights_to_hf", "transformers_tuna2.init_tuna2_from_qwen2"}
    assert converters <= set(modules)
    (loaded,) = imported("import " + ", ".join(modules))
    assert loaded & (DIFFUSERS | TRAINING_LIBRARIES | {"tuna2_training"}) == set()


def test_training_package_loads_trl_only_with_the_trainer():
    light, trainer = imported(
        "import tuna2_training, tuna2_training.data, tuna2_training.tokenizer, tuna2_training.tiny",
        "from tuna2_training.trainer import Tuna2SFTTrainer",
    )
    assert "transformers_tuna2" in light and light & (TRAINING_LIBRARIES | DIFFUSERS) == set()
    assert "trl" in trainer


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_tuna2_convert_adds_the_pipeline_files_to_the_transformers_folder(tmp_path, capsys):
    checkpoint = shutil.copy(OFFICIAL / "official.safetensors", tmp_path)
    for command, output in ((convert_weights_main, "transformers"), (convert_main, "both")):
        argv = ["--checkpoint", str(checkpoint), "--tokenizer", str(QWEN_TINY), "--output", str(tmp_path / output)]
        assert command(argv) == 0
    transformers_files, both = files_of(tmp_path / "transformers"), files_of(tmp_path / "both")
    pipeline_files = {"model_index.json", str(Path("scheduler", "scheduler_config.json"))}
    assert both.keys() - transformers_files.keys() == pipeline_files
    assert all(both[name] == content for name, content in transformers_files.items())
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"Wrote {tmp_path / 'both'}: hidden size 128")
