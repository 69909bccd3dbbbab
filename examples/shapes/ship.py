"""Copies a trained shapes-demo checkpoint into the package as its default model (`diffusers_tuna2.demo_model_path()`).

    python examples/shapes/ship.py --checkpoint shapes-demo

Writes weights, configuration, processor, scheduler and `model_index.json` to src/diffusers_tuna2/demo_model/; the
code is the installed package's, so the `auto_map` entries and the code copies that `save_pretrained` adds for
`trust_remote_code` are left out.
"""

import argparse
import json
import shutil
from pathlib import Path

from diffusers_tuna2 import Tuna2Pipeline

DEMO_FOLDER = Path(__file__).parents[2] / "src" / "diffusers_tuna2" / "demo_model"
MAX_BYTES = 60 * 2**20


def without_remote_code(folder: Path):
    for code in folder.glob("*.py"):
        code.unlink()
    for path in folder.glob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.pop("auto_map", None) is not None:
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


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
    without_remote_code(output)
    size = sum(path.stat().st_size for path in output.rglob("*") if path.is_file())
    if size > MAX_BYTES:
        raise SystemExit(f"error: the demo folder is {size / 2**20:.1f} MiB, more than {MAX_BYTES / 2**20:.0f} MiB")
    print(f"{output}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
