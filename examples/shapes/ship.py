"""Copies a trained shapes-demo checkpoint into the package as its default model (`diffusers_tuna2.demo_model_path()`).

    python examples/shapes/ship.py --checkpoint shapes-demo

Writes weights, configuration, processor, scheduler and `model_index.json` to src/diffusers_tuna2/demo_model/. The
code is the installed package's: the folder's pipeline module, which `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)` reads, imports the package's pipeline instead of holding a copy of the code.
"""

import argparse
import json
import shutil
from pathlib import Path

from diffusers_tuna2 import Tuna2Pipeline

DEMO_FOLDER = Path(__file__).parents[2] / "src" / "diffusers_tuna2" / "demo_model"
MAX_BYTES = 60 * 2**20


PIPELINE_MODULE = '''"""The pipeline module `model_index.json` names, for `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`. The shapes demo ships inside `diffusers_tuna2`, so its module is the package's; a folder
saved with `Tuna2Pipeline.save_pretrained(..., save_pipeline_code=True)` holds the whole code instead."""

from diffusers_tuna2.pipeline_tuna2 import Tuna2Pipeline

__all__ = ["Tuna2Pipeline"]
'''


def name_the_packages_pipeline(folder: Path):
    """`model_index.json` names the folder's pipeline module, which imports the package's."""
    (folder / "pipeline_tuna2.py").write_text(PIPELINE_MODULE)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = ["pipeline_tuna2", index["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a folder written by examples/sft.py --no-lora")
    parser.add_argument("--output", default=str(DEMO_FOLDER))
    parser.add_argument("--guidance-scale", type=float, default=None, help="the demo's default text-to-image CFG")
    parser.add_argument("--edit-guidance-scale", type=float, default=None, help="the demo's default editing CFG")
    args = parser.parse_args()
    output = Path(args.output)
    if output.exists():
        shutil.rmtree(output)
    pipe = Tuna2Pipeline.from_pretrained(args.checkpoint)
    for key in ("guidance_scale", "edit_guidance_scale"):
        if getattr(args, key) is not None:
            pipe.register_to_config(**{key: getattr(args, key)})
    pipe.save_pretrained(output)
    name_the_packages_pipeline(output)
    size = sum(path.stat().st_size for path in output.rglob("*") if path.is_file())
    if size > MAX_BYTES:
        raise SystemExit(f"error: the demo folder is {size / 2**20:.1f} MiB, more than {MAX_BYTES / 2**20:.0f} MiB")
    print(f"{output}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
