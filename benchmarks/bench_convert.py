"""Peak memory of converting an official-format checkpoint several times larger than one output shard.

    python benchmarks/bench_convert.py [--hidden-size 1024] [--llm-layers 16] [--flow-head-layers 8]

Writes a synthetic official `Tuna2Pixel` state dict (random fp32 weights under the official key names; LLM hidden
1024, MLP 2816, 16 heads of 64 with 4 kv heads; a flow head of the same width) as `.safetensors` and as `.pt`,
converts it with `conversion/convert_tuna2_to_hf.py` in subprocesses, and reads each subprocess's peak resident set
size (`ru_maxrss` from `wait4`; memory-mapped input pages count in it). The baseline is the peak of the converter run
with `--help`: Python, torch, transformers and diffusers imported, nothing converted. Temporary files are removed.

This process imports neither torch nor the package: a child's peak RSS includes the memory of its parent at the time
of the fork, so the checkpoint is written by a separate subprocess (`--write-checkpoint`).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).parents[1]
CONVERTER = ROOT / "conversion" / "convert_tuna2_to_hf.py"
TOKENIZER = ROOT / "tests" / "fixtures" / "conversion" / "qwen_tiny"


def write_checkpoint(folder: Path, hidden_size: int, llm_layers: int, flow_head_layers: int):
    """Writes official.safetensors, official.pt, base_config.json (the Qwen2 config) and info.json into `folder`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config

    from transformers_tuna2 import Tuna2Config, Tuna2ForConditionalGeneration
    from transformers_tuna2.convert_tuna2_weights_to_hf import hf_to_official_key

    heads, intermediate_size = hidden_size // 64, 11 * hidden_size // 4
    text_config = Qwen2Config(
        vocab_size=len(AutoTokenizer.from_pretrained(TOKENIZER)) + 4,  # the official setup adds 4 tokens
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=llm_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 4,
        tie_word_embeddings=False,
    )
    config = Tuna2Config(
        text_config=text_config,
        flow_head_num_layers=flow_head_layers,
        flow_head_num_attention_heads=heads,
        flow_head_num_key_value_heads=heads // 4,
        flow_head_intermediate_size=intermediate_size,
    )
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in Tuna2ForConditionalGeneration(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        hf_to_official_key(name): torch.ones(shape)
        if "norm" in name
        else torch.randn(shape, generator=generator) * 0.02
        for name, shape in shapes.items()
    }
    save_file(state_dict, folder / "official.safetensors")
    torch.save(state_dict, folder / "official.pt")
    text_config.to_json_file(folder / "base_config.json")
    info = {
        "num_keys": len(state_dict),
        "num_parameters": sum(tensor.numel() for tensor in state_dict.values()),
        "largest_tensor_bytes": max(tensor.numel() * tensor.element_size() for tensor in state_dict.values()),
    }
    (folder / "info.json").write_text(json.dumps(info))


def run_and_measure(command: list[str], log: Path) -> tuple[float, float]:
    """Runs `command`; returns its peak RSS in GiB and its wall time in seconds."""
    start = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss / 2**20, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def hardware() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.machine()
    )
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    memory_kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    return f"{cpu}, {os.cpu_count()} cores, {memory_kib / 2**20:.0f} GiB RAM, {platform.system()} {platform.machine()}"


def gib(path: Path) -> str:
    return f"{path.stat().st_size / 2**30:.2f} GiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--llm-layers", type=int, default=16)
    parser.add_argument("--flow-head-layers", type=int, default=8)
    parser.add_argument("--shard-sizes", nargs="+", default=["128MB", "512MB"], help="--max-shard-size values")
    parser.add_argument("--workdir", help="where to put the temporary checkpoints (default: the system's)")
    parser.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)  # the writer subprocess
    args = parser.parse_args()
    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint, args.hidden_size, args.llm_layers, args.flow_head_layers)
        return

    print(f"date: {date.today()}")
    print(f"hardware: {hardware()}")
    packages = ("torch", "transformers", "diffusers", "safetensors")
    print(f"software: Python {platform.python_version()}, " + ", ".join(f"{p} {version(p)}" for p in packages))
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        workdir = Path(workdir)
        shape_args = [f"--hidden-size={args.hidden_size}", f"--llm-layers={args.llm_layers}"]
        shape_args.append(f"--flow-head-layers={args.flow_head_layers}")
        subprocess.run([sys.executable, __file__, *shape_args, "--write-checkpoint", str(workdir)], check=True)
        info = json.loads((workdir / "info.json").read_text())
        print(
            f"checkpoint: {info['num_parameters'] / 1e6:.0f}M parameters in {info['num_keys']} tensors, fp32: "
            f"{gib(workdir / 'official.safetensors')} (.safetensors), {gib(workdir / 'official.pt')} (.pt); "
            f"largest tensor {info['largest_tensor_bytes'] / 2**20:.0f} MiB"
        )

        converter = [sys.executable, str(CONVERTER)]
        baseline, _ = run_and_measure([*converter, "--help"], workdir / "help.log")
        print(f"baseline: {' '.join(converter)} --help: peak RSS {baseline:.2f} GiB")
        runs = [("official.safetensors", None, size) for size in args.shard_sizes]
        runs += [("official.pt", None, size) for size in args.shard_sizes]
        runs.append(("official.pt", "bfloat16", args.shard_sizes[0]))
        rows = []
        for index, (checkpoint, dtype, shard_size) in enumerate(runs):
            output = workdir / f"out{index}"
            command = [
                *converter,
                *("--checkpoint", str(workdir / checkpoint), "--tokenizer", str(TOKENIZER)),
                *("--base-config", str(workdir / "base_config.json"), "--output", str(output)),
                *("--max-shard-size", shard_size, *(("--dtype", dtype) if dtype else ())),
            ]
            print(f"command: {' '.join(command)}")
            peak, seconds = run_and_measure(command, workdir / f"run{index}.log")
            weight_map = json.loads((output / "model.safetensors.index.json").read_text())["weight_map"]
            if len(weight_map) != info["num_keys"]:
                raise RuntimeError(f"{output} holds {len(weight_map)} weights instead of {info['num_keys']}")
            shard_bytes = [path.stat().st_size for path in output.glob("*.safetensors")]
            rows.append(
                f"| {checkpoint.split('.')[-1]} | {dtype or 'kept (float32)'} | {shard_size} | "
                f"{len(shard_bytes)} ({max(shard_bytes) / 2**20:.0f} MiB) | {peak:.2f} GiB | "
                f"{peak - baseline:.2f} GiB | {seconds:.1f} s |"
            )
            shutil.rmtree(output)

    print("\n| input | --dtype | --max-shard-size | shards (largest) | peak RSS | peak - baseline | time |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
