"""Tuna-2 at the official 7B shapes on this machine's CPU: build, convert, load, generate, edit and train, each with
its peak memory measured.

    python benchmarks/shapes_7b.py --workdir /big/disk/tuna2-7b --write-docs   # about an hour on 2 cores, 60 GB disk
    python benchmarks/shapes_7b.py --small --workdir /tmp/small                # the same code at tiny shapes (CI)

1. `build`: a synthetic checkpoint in the format the official trainer writes (`torch.save` of `{"model": {...},
   "step": ..., "optimizer": ..., "lr_scheduler": ...}`, keys prefixed `tuna_model.`, the learned mask token
   included) at the exact official shapes: Qwen2.5-7B-Instruct (hidden 3584, 28 layers, 28/4 heads, MLP 18944) with
   the official vocabulary of 151669 rows, and the 16-block flow head of the official 7B config. Random bf16 weights
   (`normal_init`) are written tensor by tensor into a file laid out by `torch.save` itself, so the builder holds one
   chunk of one tensor at a time. The optimizer entry is empty (Adam's state for 12.66B parameters would be 100 GB).
2. `convert`: `tuna2 convert --report` on it, against the imports alone (`tuna2 convert --help`).
3. Each loading mode in its own process: bf16; understanding only (`load_flow_head=False`); the language model in
   int8; language model and flow head in int8; diffusers' block-level group offloading to disk; transformers'
   `device_map="auto"` with `max_memory` and an offload folder. In each: `generate()` of 8 tokens for a 64x64 image
   and a question, `Tuna2Pipeline` text-to-image at 64x64 (2 steps, CFG with the official negative prompt), one edit
   step at 64x64, as the mode allows. One LoRA SFT step (gradient checkpointing, a t2i and an understanding sample)
   through `Tuna2SFTTrainer`, TRL and PEFT.
4. The machine's limit beside the model: one decode step and one cached denoising step against the bare matmuls
   (`F.linear`, `F.conv2d`) of the same weights at the same shapes, recorded by hooks on the real step.

Every measured process runs under a memory limit (a memory cgroup where this machine allows one, else
`RLIMIT_AS`), with the highest OOM score, so that running out of memory ends that process, which is then recorded as
not fitting. Peak RSS is `ru_maxrss` from `wait4` (memory-mapped file pages count in it); inside a process each
phase's peak is `VmHWM` after resetting it (`/proc/self/clear_refs`), and the process's peak the largest of both.
The process's largest anonymous and mapped-file RSS are sampled apart. The files made are removed at the end unless
`--keep`; each process's figures are kept in `rows.json` in the work folder, so that `--steps` / `--modes` redo only
those named and the table holds them all.
"""

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- shapes-7b:begin -->", "<!-- shapes-7b:end -->"
TOKENIZER = ROOT / "tests" / "fixtures" / "conversion" / "qwen_tiny"
GiB = 1024**3

# Qwen2.5-7B-Instruct's config.json (the base LLM the converter reads what shapes cannot tell from).
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
OFFICIAL_VOCAB_SIZE = 151669
# The official 7B flow head: 16 blocks of the LLM's width and MLP, 56 query and 14 key/value heads of 64.
FLOW_HEAD_7B = {"layers": 16, "heads": 56, "kv_heads": 14}
# --small: the same code at shapes a CI machine runs in seconds (head dims as the official ones, 128 and 64).
QWEN_SMALL = {
    **QWEN25_7B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "max_window_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
FLOW_HEAD_SMALL = {"layers": 2, "heads": 4, "kv_heads": 1}

PROMPT = "a red fox reading a newspaper on a park bench"
EDIT = "make the fox blue"
QUESTION = "What is in the image?"
SIZE = 64
NEW_TOKENS = 8


# ----------------------------------------------------------------------------------------------------------------
# The runs: (name, what the table says, the loading mode, the phases)
# ----------------------------------------------------------------------------------------------------------------

MODES = {
    "bf16": "`from_pretrained(path, dtype=torch.bfloat16)`",
    "understanding": "`load_flow_head=False`, bf16",
    "llm-int8": '`quantization_config=quantization_config(llm="int8")`: language model int8, rest bf16',
    "int8": '`quantization_config=quantization_config(llm="int8", flow_head="int8")`: both int8, rest bf16',
    "nf4": "`quantization_config=nf4_quantization_config()`: both bitsandbytes NF4, rest bf16",
    "group-offload": "bf16, diffusers `apply_group_offloading(model, block_level, offload_to_disk_path=...)`",
    "device-map": 'bf16, `device_map="auto", max_memory={"cpu": ...}, offload_folder=...`',
}
# The phases each mode runs, in order; `lora` is the LoRA SFT step, `decode`/`denoise` the efficiency rows.
# (`denoise` is text-to-image with 3 steps, the third recorded.) Offloading modes read their offloaded weights from
# disk at every forward, so they run the fewest forwards that show their memory.
RUNS = {
    "bf16": ("generate", "t2i", "edit"),
    "understanding": ("generate", "decode"),
    "llm-int8": ("generate", "denoise", "edit"),
    "int8": ("t2i", "edit", "lora"),
    "nf4": ("t2i",),
    "group-offload": ("t2i",),
    "device-map": ("generate",),
}


# ----------------------------------------------------------------------------------------------------------------
# Measured processes (this process imports neither torch nor the package: a child's ru_maxrss starts from the size
# of its parent at the fork)
# ----------------------------------------------------------------------------------------------------------------


def own_memory_cgroup() -> tuple[Path, str] | None:
    """The memory cgroup this process is in, if it can hold a child group: (folder, "v1" or "v2")."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") and Path("/sys/fs/cgroup/memory").is_dir():
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if os.access(folder, os.W_OK):
                return folder, "v1"
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").is_file() and "memory" in (v2 / "cgroup.controllers").read_text().split():
        path = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
        if path is not None and os.access(v2 / path.lstrip("/"), os.W_OK):
            return v2 / path.lstrip("/"), "v2"
    return None


class MemoryLimit:
    """A memory limit for one child process: a child memory cgroup where this machine lets us make one, else
    `RLIMIT_AS` (which also counts address space that is mapped but never touched)."""

    def __init__(self, limit_bytes: int, name: str):
        self.limit_bytes = limit_bytes
        self.group = None
        parent = own_memory_cgroup()
        if parent is not None:
            folder, kind = parent
            group = folder / f"{name}-{os.getpid()}"
            try:
                group.mkdir(exist_ok=True)
                limit_file = "memory.limit_in_bytes" if kind == "v1" else "memory.max"
                (group / limit_file).write_text(str(limit_bytes))
                self.group, self.kind = group, kind
            except OSError:
                self.group = None
        self.mechanism = f"memory cgroup {self.kind}" if self.group else "RLIMIT_AS"

    def preexec(self):
        """Runs in the child before `exec`: join the group (or set the limit) and be the first the OOM killer ends."""
        Path("/proc/self/oom_score_adj").write_text("1000")
        if self.group is not None:
            (self.group / "cgroup.procs").write_text(str(os.getpid()))
        else:
            resource.setrlimit(resource.RLIMIT_AS, (self.limit_bytes, self.limit_bytes))

    def out_of_memory(self) -> bool:
        if self.group is None:
            return False
        if self.kind == "v1":
            return (
                int((self.group / "memory.failcnt").read_text()) > 0
                and "oom_kill 0" not in (self.group / "memory.oom_control").read_text()
            )
        events = dict(line.split() for line in (self.group / "memory.events").read_text().splitlines())
        return int(events.get("oom_kill", 0)) > 0

    def close(self):
        if self.group is not None:
            self.group.rmdir()


def sample_memory(pid: int, peaks: dict, done: threading.Event):
    """Keeps the largest RssAnon and RssFile of `pid` (mapped files against memory the process allocated)."""
    while not done.wait(0.2):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)


def measure(command: list[str], log: Path, limit_bytes: int, name: str, timeout: float | None = None) -> dict:
    """Runs `command` under the memory limit (and ends it after `timeout` seconds); returns its exit, wall time and
    peak memory."""
    limit = MemoryLimit(limit_bytes, name)
    peaks, done = {}, threading.Event()
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit.preexec)
        sampler = threading.Thread(target=sample_memory, args=(process.pid, peaks, done), daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, process.terminate) if timeout else None
        if timer is not None:
            timer.start()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        timed_out = timer is not None and not timer.is_alive()
        if timer is not None:
            timer.cancel()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    killed = process.returncode < 0
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    # The cgroup's OOM killer ends the process; under RLIMIT_AS an allocation fails instead.
    out_of_memory = limit.out_of_memory() or (killed and -process.returncode == 9) or "MemoryError" in tail[0]
    out_of_memory = out_of_memory or "alloc" in tail[0] and "memory" in tail[0]
    limit.close()
    return {
        "exit_code": process.returncode,
        "timed_out": timed_out,
        "out_of_memory": out_of_memory and not timed_out,
        "limit_gib": limit_bytes / GiB,
        "limit_mechanism": limit.mechanism,
        "seconds": seconds,
        "peak_rss_gib": usage.ru_maxrss * 1024 / GiB,
        "peak_anon_gib": peaks.get("RssAnon", 0) / GiB,
        "peak_file_gib": peaks.get("RssFile", 0) / GiB,
        "last_line": tail[0][-300:],
    }


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def child_command(args, step: str, result: Path) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", step, "--workdir", str(args.workdir)]
    command += ["--result", str(result), "--threads", str(args.threads)]
    return command + (["--small"] if args.small else [])


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def run_all(args) -> dict:
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    limit = int(args.memory_limit_gib * GiB)
    checkpoint, converted = workdir / "official" / "model.pt", workdir / "converted"
    tuna2 = [sys.executable, "-m", "diffusers_tuna2.cli"]

    saved = workdir / "rows.json"
    rows = json.loads(saved.read_text()) if saved.is_file() else {}

    def record(name: str, command: list[str]) -> dict:
        result = workdir / f"{name}.json"
        result.unlink(missing_ok=True)
        row = measure(command, workdir / f"{name}.log", limit, "tuna2-shapes", args.timeout_minutes * 60)
        if result.is_file():
            row.update(json.loads(result.read_text()))
        # Resetting VmHWM for a phase's peak resets what ru_maxrss reports at exit too: the process's peak is the
        # largest of its phases'.
        phases = [
            value["peak_rss_gib"] for value in row.values() if isinstance(value, dict) and "peak_rss_gib" in value
        ]
        row["peak_rss_gib"] = max([row["peak_rss_gib"], *phases])
        rows[name] = row
        saved.write_text(json.dumps(rows, indent=2))  # runs can be resumed: --steps/--modes redo only those named
        status = "out of memory" if row["out_of_memory"] else f"exit {row['exit_code']}"
        print(f"{name}: {status}, {row['seconds']:.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
        return row

    if "build" in args.steps:
        record("build", child_command(args, "build", workdir / "build.json"))
    if "convert" in args.steps:
        base = workdir / "base"
        shutil.rmtree(base, ignore_errors=True)
        shutil.copytree(TOKENIZER, base)
        (base / "config.json").write_text(json.dumps(QWEN_SMALL if args.small else QWEN25_7B, indent=2))
        shutil.rmtree(converted, ignore_errors=True)
        record("convert-imports", [*tuna2, "convert", "--help"])
        command = [*tuna2, "convert", "--checkpoint", str(checkpoint), "--tokenizer", str(base)]
        row = record("convert", command + ["--output", str(converted), "--report"])
        if row["exit_code"] == 0:
            shards = sorted(converted.glob("*.safetensors"))
            row.update(
                shards=len(shards),
                largest_shard_gib=max(path.stat().st_size for path in shards) / GiB,
                output_gib=folder_bytes(converted) / GiB,
                input_gib=checkpoint.stat().st_size / GiB,
            )
            saved.write_text(json.dumps(rows, indent=2))
        if not args.keep:
            shutil.rmtree(checkpoint.parent, ignore_errors=True)
    for mode in args.modes:
        record(mode, child_command(args, mode, workdir / f"{mode}.json"))
        shutil.rmtree(workdir / "offload", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The child processes
# ----------------------------------------------------------------------------------------------------------------


def normal_init(official_key: str, num_layers: int) -> tuple[str, float]:
    """How the builder draws a weight: norms 1, biases 0, matrices N(0, 0.02) with the projections that write into
    a residual stream scaled by 1/sqrt(2 * layers) (GPT-2's scheme), so that the residual stream of 28 random layers
    stays within a few times its input and the activations stay in the range of a trained model."""
    if "norm" in official_key:
        return "ones", 1.0
    if official_key.endswith(".bias"):
        return "zeros", 0.0
    if official_key.endswith(("o_proj.weight", "down_proj.weight")):
        return "normal", 0.02 / (2 * num_layers) ** 0.5
    return "normal", 0.02


def official_shapes(small: bool) -> dict[str, tuple[int, ...]]:
    """The official training checkpoint's keys (`tuna_model.` + the `Tuna2Pixel` key) and shapes, from our model
    built on the meta device at the official shapes."""
    import torch
    from transformers import Qwen2Config

    from transformers_tuna2 import Tuna2Config, Tuna2ForConditionalGeneration
    from transformers_tuna2.convert_tuna2_weights_to_hf import hf_to_official_key

    qwen, flow = (QWEN_SMALL, FLOW_HEAD_SMALL) if small else (QWEN25_7B, FLOW_HEAD_7B)
    text_config = Qwen2Config(**{**qwen, "vocab_size": OFFICIAL_VOCAB_SIZE})
    config = Tuna2Config(
        text_config=text_config,
        flow_head_num_layers=flow["layers"],
        flow_head_num_attention_heads=flow["heads"],
        flow_head_num_key_value_heads=flow["kv_heads"],
        flow_head_head_dim=text_config.hidden_size // flow["heads"],
        flow_head_intermediate_size=text_config.intermediate_size,
        use_mask_token=True,
    )
    with torch.device("meta"):
        model = Tuna2ForConditionalGeneration(config)
    return {f"tuna_model.{hf_to_official_key(name)}": tuple(t.shape) for name, t in model.state_dict().items()}


def build(workdir: Path, small: bool) -> dict:
    """Writes official/model.pt as the official trainer lays it out, one chunk of one tensor in memory at a time."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from transformers_tuna2.convert_tuna2_weights_to_hf import StoredTensor, TorchCheckpointFile, unwrap_state_dict

    shapes = official_shapes(small)
    num_layers = (QWEN_SMALL if small else QWEN25_7B)["num_hidden_layers"]
    path = workdir / "official" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch.save lays the file out (pickle, one record per storage, aligned) with holes where the bytes go.
    with FakeTensorMode():
        fake = {key: torch.empty(shape, dtype=torch.bfloat16) for key, shape in shapes.items()}
    checkpoint = {
        "model": fake,
        "step": 0,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": []}]},
        "lr_scheduler": {"last_epoch": 0},
    }
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(checkpoint, path)
    del fake, checkpoint
    # Each tensor's bytes go where the file's own records put them, as the converter reads them back.
    written = TorchCheckpointFile(path)
    stored_tensors = unwrap_state_dict(written.content, path)
    generator = torch.Generator().manual_seed(0)
    chunk_values = 1 << 26
    first_values = {}
    with open(path, "r+b") as file:
        for key, shape in shapes.items():
            stored = stored_tensors[key]
            if stored.shape != shape or stored.storage_offset != 0:
                raise RuntimeError(f"torch.save laid {key} out as {stored}, not as a tensor of its own")
            kind, std = normal_init(key.removeprefix("tuna_model."), num_layers)
            file.seek(written.data_offset(file, stored.record))
            numel = math.prod(shape)
            for start in range(0, numel, chunk_values):
                chunk = torch.empty(min(chunk_values, numel - start), dtype=torch.bfloat16)
                if kind == "normal":
                    chunk.normal_(0.0, std, generator=generator)
                else:
                    chunk.fill_(std)
                if start == 0:
                    first_values[key] = chunk[:4].float().tolist()
                file.write(chunk.view(torch.uint8).numpy().data)
        for key, values in first_values.items():
            stored = stored_tensors[key]
            head = written.read(file, StoredTensor(stored.record, stored.dtype, 0, (4,), (1,)))
            if head.float().tolist() != values:
                raise RuntimeError(f"{key} does not read back as written")
    numel = sum(math.prod(stored.shape) for stored in stored_tensors.values())
    return {"tensors": len(shapes), "parameters": numel, "weight_gib": numel * 2 / GiB}


def phase_peak_reset():
    """Resets this process's peak RSS (VmHWM) so that the next read gives the peak of what follows."""
    Path("/proc/self/clear_refs").write_text("5")


def phase_peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GiB
    raise RuntimeError("no VmHWM in /proc/self/status")


def tensor_bytes(tensor) -> int:
    """Bytes a parameter holds in memory: a quantized tensor's inner tensors; nothing for an offloaded one."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    if tensor.device.type == "meta":
        return 0
    return tensor.untyped_storage().nbytes() if tensor.numel() else 0


def resident_weight_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


def load(mode: str, folder: Path, workdir: Path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import transformers_tuna2  # noqa: F401  (registers Tuna-2 with the Auto classes)

    kwargs = {"dtype": torch.bfloat16}
    if mode in ("llm-int8", "int8", "nf4"):
        from transformers_tuna2.quantization import nf4_quantization_config, quantization_config

    if mode == "understanding":
        kwargs["load_flow_head"] = False
    elif mode == "llm-int8":
        kwargs["quantization_config"] = quantization_config(llm="int8")
    elif mode == "int8":
        kwargs["quantization_config"] = quantization_config(llm="int8", flow_head="int8")
    elif mode == "nf4":
        kwargs["quantization_config"] = nf4_quantization_config()
    elif mode == "device-map":
        # Half the weights stay in memory (the token embedding among them, so that `model.device` is the CPU); the
        # rest is read from the offload folder module by module.
        kwargs.update(
            device_map="auto",
            max_memory={"cpu": folder_bytes(folder) // 2},
            offload_folder=str(workdir / "offload"),
        )
    model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs).eval()
    if mode == "group-offload":
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(
            model,
            onload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            offload_to_disk_path=str(workdir / "offload"),
        )
    return model, AutoProcessor.from_pretrained(folder)


def test_image():
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:SIZE, 0:SIZE]
    pixels = np.stack([x * 4, y * 4, ((x // 8 + y // 8) % 2) * 255], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def understanding_inputs(model, processor):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": test_image()}, {"type": "text", "text": QUESTION}]}
    ]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)


class LinearRecorder:
    """Forward hooks on every `nn.Linear` and `nn.Conv2d` of a model and a profiler: between `start()` and `stop()`,
    keeps each call's module and input shape and the operators' self times; `bare_seconds` replays the same calls
    with `F.linear` / `F.conv2d` over the same weight tensors."""

    def __init__(self, model):
        import torch

        self.calls, self.recording = [], False
        self.handles = [
            module.register_forward_pre_hook(self.before)
            for module in model.modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        ]
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def before(self, module, inputs):
        if self.recording:
            self.calls.append((module, tuple(inputs[0].shape), inputs[0].dtype))

    def start(self):
        self.recording = True
        self.profiler.start()

    def stop(self):
        self.profiler.stop()
        self.recording = False
        for handle in self.handles:
            handle.remove()

    def top_ops(self, count: int = 6) -> list[str]:
        """The operators that took most of the recorded call, by self CPU time."""
        events = sorted(self.profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
        total = sum(event.self_cpu_time_total for event in events)
        return [f"{event.key} {100 * event.self_cpu_time_total / total:.0f}%" for event in events[:count]]

    def bare_seconds(self, repeats: int = 3) -> float:
        import torch
        import torch.nn.functional as F

        inputs = [torch.randn(shape, dtype=dtype) for _, shape, dtype in self.calls]
        times = []
        with torch.no_grad():
            for _ in range(repeats):
                start = time.perf_counter()
                for (module, _, _), x in zip(self.calls, inputs):
                    if isinstance(module, torch.nn.Linear):
                        F.linear(x, module.weight, module.bias)
                    else:
                        F.conv2d(x, module.weight, module.bias, module.stride, module.padding)
                times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    def efficiency(self, step_seconds: float) -> dict:
        bare = self.bare_seconds()
        return {
            "step_s": step_seconds,
            "bare_matmul_s": bare,
            "efficiency": bare / step_seconds,
            "matmul_calls": len(self.calls),
            "tokens": sorted({math.prod(shape[:-1]) for module, shape, _ in self.calls if module.weight.dim() == 2}),
            "top_ops": self.top_ops(),
        }


def phase_generate(model, processor) -> dict:
    import torch

    inputs = understanding_inputs(model, processor)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    new = ids[0, inputs["input_ids"].shape[1] :]
    return {"prompt_tokens": inputs["input_ids"].shape[1], "new_tokens": len(new)}


def phase_decode(model, processor) -> dict:
    """One cached decode step (one new token after the image and question) against its bare matmuls."""
    import torch

    inputs = understanding_inputs(model, processor)
    prefill = model(**inputs, use_cache=True, logits_to_keep=1)
    cache, next_token = prefill.cache, prefill.logits[:, -1:].argmax(-1)
    mask = torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=inputs["attention_mask"].dtype)

    def step():
        model(input_ids=next_token, attention_mask=mask, cache=cache, use_cache=True)
        cache.crop(-1)  # back to the prompt, for the next repeat

    times = []
    for _ in range(4):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    recorder = LinearRecorder(model)
    recorder.start()
    step()
    recorder.stop()
    return recorder.efficiency(sorted(times[1:])[1])


def pipeline(model, processor):
    from diffusers_tuna2 import Tuna2Pipeline

    pipe = Tuna2Pipeline(model=model, processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def phase_t2i(model, processor, steps: int = 2, recorder: LinearRecorder | None = None) -> dict:
    """Text-to-image at SIZE x SIZE; with `recorder`, records the third step (a cached step, as all are)."""
    import torch

    pipe = pipeline(model, processor)
    step_ends = []

    def on_step_end(pipe, index, timestep, callback_kwargs):
        step_ends.append(time.perf_counter())
        if recorder is not None and index == 1:
            recorder.start()
        elif recorder is not None and index == 2:
            recorder.stop()
        return callback_kwargs

    start = time.perf_counter()
    images = pipe(
        PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=on_step_end,
        output_type="pt",
    ).images
    return {
        "seconds": time.perf_counter() - start,
        "step_s": [b - a for a, b in zip(step_ends, step_ends[1:])],
        "finite": bool(torch.isfinite(images).all()),
    }


def phase_edit(model, processor) -> dict:
    import torch

    pipe = pipeline(model, processor)
    start = time.perf_counter()
    images = pipe(
        EDIT,
        image=test_image(),
        height=SIZE,
        width=SIZE,
        num_inference_steps=1,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    return {"seconds": time.perf_counter() - start, "finite": bool(torch.isfinite(images).all())}


def phase_denoise(model, processor) -> dict:
    """One cached denoising step of text-to-image (both CFG branches) against its bare matmuls: the second step
    timed, the third recorded."""
    recorder = LinearRecorder(model)
    row = phase_t2i(model, processor, steps=3, recorder=recorder)
    return recorder.efficiency(row["step_s"][0])


def phase_lora(model, processor, workdir: Path) -> dict:
    """One LoRA SFT step through the project's trainer (TRL's SFTTrainer with the model's own loss), gradient
    checkpointing on, a batch of one text-to-image and one understanding sample."""
    from peft import LoraConfig
    from trl import SFTConfig

    from tuna2_training.data import Tuna2Collator, Tuna2MixtureDataset, Tuna2Sample
    from tuna2_training.trainer import Tuna2SFTTrainer, lora_target_modules

    image = test_image()
    streams = {
        "t2i": [Tuna2Sample(task="t2i", origin="bench:t2i", text=PROMPT, images=[image])],
        "mmu": [
            Tuna2Sample(
                task="mmu",
                origin="bench:mmu",
                messages=[
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "A fox reading a newspaper."}]},
                ],
                images=[image],
            )
        ],
    }
    dataset = Tuna2MixtureDataset(streams, {"t2i": 1.0, "mmu": 1.0}, length=2, seed=0, task_batch_size=1)
    config = SFTConfig(
        output_dir=str(workdir / "lora"),
        max_steps=1,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        train_sampling_strategy="sequential",
        bf16=True,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
    )
    trainer = Tuna2SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset.to_hf_dataset(),
        data_collator=Tuna2Collator(processor, image_size=SIZE),
        processing_class=processor,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=lora_target_modules("all")),
    )
    start = time.perf_counter()
    output = trainer.train()
    model.eval()  # the Trainer leaves the model in training mode
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "seconds": time.perf_counter() - start,
        "loss": losses[-1]["loss"] if losses else output.training_loss,
        "lm_loss": losses[-1].get("lm_loss") if losses else None,
        "flow_loss": losses[-1].get("flow_loss") if losses else None,
        "trainable_parameters": trainable,
    }


def run_mode(mode: str, workdir: Path, result_file: Path):
    """Loads the converted model in `mode` and runs its phases, writing what is measured to `result_file` after the
    load and after every phase: a process ended by the memory limit leaves what it finished."""
    import torch

    folder = workdir / "converted"
    result = {"mode": mode}
    phase_peak_reset()
    start = time.perf_counter()
    model, processor = load(mode, folder, workdir)
    result["load"] = {"seconds": time.perf_counter() - start, "peak_rss_gib": phase_peak_gib()}
    result["weight_gib"] = resident_weight_bytes(model) / GiB
    result_file.write_text(json.dumps(result))
    phases = {
        "generate": lambda: phase_generate(model, processor),
        "decode": lambda: phase_decode(model, processor),
        "t2i": lambda: phase_t2i(model, processor),
        "edit": lambda: phase_edit(model, processor),
        "denoise": lambda: phase_denoise(model, processor),
        "lora": lambda: phase_lora(model, processor, workdir),
    }
    for name in RUNS[mode]:
        phase_peak_reset()
        start = time.perf_counter()
        with torch.inference_mode(name != "lora"):
            row = phases[name]()
        row.setdefault("seconds", time.perf_counter() - start)
        row["peak_rss_gib"] = phase_peak_gib()
        result[name] = row
        result_file.write_text(json.dumps(result))


def child(args):
    import torch

    torch.set_num_threads(args.threads)
    if args.child == "build":
        args.result.write_text(json.dumps(build(args.workdir, args.small)))
    else:
        run_mode(args.child, args.workdir, args.result)


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------


def status(row: dict) -> str:
    if row.get("timed_out"):
        return f"stopped after {row['seconds'] / 60:.0f} minutes (`--timeout-minutes`)"
    if row["out_of_memory"]:
        return "**does not fit**: ended by the memory limit"
    if row["exit_code"] != 0:
        return f"failed: {row['last_line']}"
    return "ok"


def target_text(peak: float, target: float) -> str:
    return f"{target:.2f}: {'met' if peak <= target else '**missed**'}"


PHASE_DETAILS = {
    "generate": lambda p: (
        f"`generate()`: {p['new_tokens']} new tokens after {p['prompt_tokens']} (the image at its 512x512 bucket)"
    ),
    "t2i": lambda p: (
        f"text-to-image {SIZE}x{SIZE}, 2 steps, CFG; {p['seconds']:.0f} s, cached step "
        f"{p['step_s'][0]:.1f} s; finite: {p['finite']}"
    ),
    "edit": lambda p: f"edit {SIZE}x{SIZE}, 1 step; finite: {p['finite']}",
    "lora": lambda p: (
        f"LoRA SFT step (r 16, LLM + flow head): loss {p['loss']:.3f} (lm {float(p['lm_loss']):.3f}, "
        f"flow {float(p['flow_loss']):.3f}); {p['trainable_parameters'] / 1e6:.1f}M trained"
    ),
    "decode": lambda p: "decode step: " + efficiency_text(p),
    "denoise": lambda p: "cached denoising step: " + efficiency_text(p),
}


def efficiency_text(phase: dict) -> str:
    return (
        f"{phase['step_s']:.2f} s against bare matmuls {phase['bare_matmul_s']:.2f} s ({phase['matmul_calls']} "
        f"calls at {phase['tokens']} tokens): efficiency **{phase['efficiency']:.2f}**; self time: "
        + ", ".join(phase["top_ops"][:4])
    )


def markdown(result: dict) -> str:
    """The table: one row per process and phase; peak RSS against the target of the issue that asked for it
    (inference 1.1 x the weights held + 2 GiB, a LoRA step the weights + 4 GiB, conversion 2 shards above the
    imports)."""
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"Command: `{meta['command']}`",
        "",
        f"{meta['date']}, {meta['machine']}, {meta['versions']}; {meta['threads']} threads; every process under a "
        f"{meta['limit_gib']:.1f} GiB memory limit ({meta['limit_mechanism']}). Memory in GiB.",
        "",
        "| what | mode | weights held | peak RSS | target | time (s) | result |",
        "|---|---|---|---|---|---|---|",
    ]
    if "build" in rows:
        row = rows["build"]
        lines.append(
            f"| build the official-format `model.pt` | {row.get('tensors', '?')} tensors, "
            f"{row.get('parameters', 0) / 1e9:.2f}B parameters, bf16 | {row.get('weight_gib', 0):.2f} (written) | "
            f"{row['peak_rss_gib']:.2f} | - | {row['seconds']:.0f} | {status(row)} |"
        )
    if "convert" in rows:
        row, base = rows["convert"], rows["convert-imports"]
        if row["exit_code"] == 0:
            target = target_text(row["peak_rss_gib"], base["peak_rss_gib"] + 2 * row["largest_shard_gib"])
            result_text = (
                f"{row['shards']} shards, the largest {row['largest_shard_gib']:.2f}; imports alone (`--help`) "
                f"{base['peak_rss_gib']:.2f}"
            )
        else:
            target, result_text = "-", status(row)
        lines.append(
            f"| `tuna2 convert --report` | keeps bf16 | {row.get('output_gib', 0):.2f} (written) | "
            f"{row['peak_rss_gib']:.2f} | {target} | {row['seconds']:.0f} | {result_text} |"
        )
    for mode, description in MODES.items():
        if mode not in rows:
            continue
        row = rows[mode]
        weights = row.get("weight_gib")
        held = "-" if weights is None else f"{weights:.2f}"
        if mode == "group-offload" and weights is not None:
            # The parameters keep their tensors, but each group's weights come from the offload folder at its turn.
            held = f"one block at a time ({weights:.2f} on disk)"
        load = row.get("load")
        if load is None:
            lines.append(f"| load | {mode}: {description} | - | {row['peak_rss_gib']:.2f} | - | "
                         f"{row['seconds']:.0f} | {status(row)} |")  # fmt: skip
            continue
        target = target_text(load["peak_rss_gib"], 1.1 * weights + 2) if mode != "group-offload" else "-"
        lines.append(
            f"| load | {mode}: {description} | {held} | {load['peak_rss_gib']:.2f} | {target} | "
            f"{load['seconds']:.0f} | {status(row)}; the process's peaks: {row['peak_anon_gib']:.2f} anonymous, "
            f"{row['peak_file_gib']:.2f} in mapped files |"
        )
        for name in RUNS[mode]:
            phase = row.get(name)
            if phase is None:
                lines.append(f"| {name} | {mode} | {held} | - | - | - | {status(row)} |")
                continue
            bound = weights + 4 if name == "lora" else 1.1 * weights + 2
            target = target_text(phase["peak_rss_gib"], bound) if mode != "group-offload" else "-"
            lines.append(
                f"| {name} | {mode} | {held} | {phase['peak_rss_gib']:.2f} | {target} | {phase['seconds']:.1f} | "
                f"{PHASE_DETAILS[name](phase)} |"
            )
    return "\n".join(lines)


def write_docs(table: str):
    text = DOCS.read_text()
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.write_text(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, required=True, help="folder for the checkpoints (60 GB at 7B)")
    parser.add_argument("--small", action="store_true", help="tiny shapes, the same code (seconds, for CI)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and offload folders")
    parser.add_argument("--steps", nargs="*", default=["build", "convert"], choices=["build", "convert"])
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=(available_memory() - int(1.5 * GiB)) / GiB,
        help="memory limit of each measured process (default: the machine's memory less 1.5 GiB)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--timeout-minutes", type=float, default=40, help="end a process that runs longer")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.workdir = args.workdir.resolve()
    if args.child:
        child(args)
        return 0
    rows = run_all(args)
    result = {
        "meta": {
            "command": "python benchmarks/shapes_7b.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": str(date.today()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {available_memory() / GiB:.1f} GiB RAM",
            "versions": ", ".join(
                f"{name} {version(name)}" for name in ("torch", "transformers", "diffusers", "torchao", "peft", "trl")
            ),
            "threads": args.threads,
            "limit_gib": args.memory_limit_gib,
            "limit_mechanism": next((row["limit_mechanism"] for row in rows.values()), "-"),
            "small": args.small,
        },
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    table = markdown(result)
    print(table)
    if args.write_docs:
        write_docs(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
