"""One command for the speed and memory figures of Tuna-2 at the official 7B shapes (random weights, bf16).

    python benchmarks/gpu_suite.py --device cuda --json gpu_suite.json --write-docs   # 7B preset, one GPU
    python benchmarks/gpu_suite.py --tiny --device cpu --json /tmp/tiny.json          # the same code paths, small

Measures, each with its peak memory (CUDA: `torch.cuda.max_memory_allocated` since a reset; CPU: the process's peak
RSS so far, which never goes down):

- text-to-image (512x512, 50 steps, CFG on, the official negative prompt): s/image with the prefix cache on and off,
  for the attention implementations sdpa and flex (flex only where `model._supports_flex_attn`, else recorded as
  "not supported"), beside the span FLOPs of `bench_t2i.span_flops` (the work of a cached step), the achieved
  TFLOP/s and the time that work takes at the device's dense peak (`--peak-tflops`, known for H100/H200/A100);
- editing (512x512 source, same steps): s/image with the prefix cache;
- understanding (one image and a question, greedy): prefill and decode tokens/s at batch sizes 1 and 8;
- one LoRA SFT step (PEFT LoRA on the language-model and flow-head linears, `lora_target_modules("all")`, AdamW on
  the adapters) and one full SFT step (AdamW on every parameter, gradient checkpointing): tokens/s.

`--tiny` runs the tiny model (`tuna2_training.tiny`, fp32) on a 32x48 image, 2 steps, batch sizes 1 and 2, a few
decoded tokens: the CI check of every path (tests/test_gpu_suite.py). `--write-docs` puts the table into
docs/benchmarks.md between the `gpu-suite` markers; without it the table is printed.
"""

import argparse
import json
import platform
import resource
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_t2i import random_model, span_flops  # noqa: E402
from memory_7b import memory_rows  # noqa: E402

from diffusers_tuna2 import DEFAULT_NEGATIVE_PROMPT, Tuna2Pipeline  # noqa: E402
from transformers_tuna2 import Tuna2ImageRole  # noqa: E402
from tuna2_training.tiny import build_processor, build_tokenizer  # noqa: E402
from tuna2_training.trainer import lora_target_modules  # noqa: E402

GiB = 1024**3
DOCS = Path(__file__).parents[1] / "docs" / "benchmarks.md"
BEGIN, END = "<!-- gpu-suite:begin -->", "<!-- gpu-suite:end -->"
# Dense bf16 peak TFLOP/s (no sparsity) of known devices.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
PROMPT = "a red fox reading a newspaper on a park bench"
QUESTION = "Describe the image in detail."
ATTENTION = ("sdpa", "flex_attention")


class Device:
    def __init__(self, name: str):
        self.name = name
        self.cuda = name.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / GiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB

    def timed(self, fn):
        """(seconds, result, peak GiB) of one call, after a reset of the peak."""
        self.reset_peak()
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return time.perf_counter() - start, result, self.peak_gib()


def t2i_flops(pipe: Tuna2Pipeline, height: int, width: int, steps: int) -> float:
    """Span FLOPs of one image: both CFG branches, each with its own prefix, at every step."""
    prefixes = pipe.processor.generation_inputs([PROMPT, DEFAULT_NEGATIVE_PROMPT], height, width)
    span = pipe.processor.num_span_slots(height, width)
    per_step = sum(span_flops(pipe.model.config, span, int(n)) for n in prefixes["attention_mask"].sum(1))
    return per_step * steps


def set_attention(model, implementation: str) -> str | None:
    """Switches the attention implementation; returns why it cannot, or None."""
    if implementation == "flex_attention" and not getattr(model, "_supports_flex_attn", False):
        return "not supported"
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError, NotImplementedError) as error:
        return f"not available: {str(error).splitlines()[0]}"
    return None


def bench_t2i(pipe, device: Device, args, peak_tflops: float | None) -> list[dict]:
    kwargs = dict(height=args.height, width=args.width, num_inference_steps=args.steps, output_type="latent")
    flops = t2i_flops(pipe, args.height, args.width, args.steps)
    rows = []
    for implementation in ATTENTION:
        reason = set_attention(pipe.model, implementation)
        for use_cache in (True, False):
            row = {"attention": implementation, "prefix_cache": use_cache, "span_flops_per_image": flops}
            if reason is not None:
                rows.append({**row, "status": reason})
                continue
            try:
                pipe(PROMPT, **{**kwargs, "num_inference_steps": 1}, use_prefix_cache=use_cache)  # warm-up
                seconds, _, peak = device.timed(
                    lambda: pipe(
                        PROMPT, generator=torch.Generator().manual_seed(0), use_prefix_cache=use_cache, **kwargs
                    )
                )
            except Exception as error:  # e.g. out of memory, or a kernel the device's compiler cannot build
                rows.append({**row, "status": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"})
                continue
            row.update(status="ok", seconds_per_image=seconds, peak_memory_gib=peak, tflops=flops / seconds / 1e12)
            row["seconds_at_peak_flops"] = flops / (peak_tflops * 1e12) if peak_tflops else None
            rows.append(row)
    set_attention(pipe.model, "sdpa")
    return rows


def bench_edit(pipe, device: Device, args) -> dict:
    source = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    kwargs = dict(image=source, height=args.height, width=args.width, num_inference_steps=args.steps)
    pipe("make it blue", **{**kwargs, "num_inference_steps": 1}, output_type="latent")  # warm-up
    seconds, _, peak = device.timed(
        lambda: pipe("make it blue", generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs)
    )
    return {"seconds_per_image": seconds, "peak_memory_gib": peak}


def understanding_inputs(processor, size: tuple[int, int], batch_size: int, device: str, dtype: torch.dtype):
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return {
        "input_ids": inputs["input_ids"].repeat(batch_size, 1).to(device),
        "attention_mask": inputs["attention_mask"].repeat(batch_size, 1).to(device),
        "pixel_values": inputs["pixel_values"].repeat(batch_size, 1, 1, 1).to(device, dtype),
    }


def bench_understanding(model, processor, device: Device, args, dtype) -> list[dict]:
    rows = []
    new_tokens = args.new_tokens
    for batch_size in args.batch_sizes:
        inputs = understanding_inputs(processor, (args.height, args.width), batch_size, device.name, dtype)
        length = inputs["input_ids"].shape[1]
        generate = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        with torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up
            model.generate(**inputs, **{**generate, "max_new_tokens": 2, "min_new_tokens": 2})
            prefill, _, prefill_peak = device.timed(lambda: model(**inputs, use_cache=True, logits_to_keep=1))
            total, _, peak = device.timed(lambda: model.generate(**inputs, **generate))
        decode = max(total - prefill, 1e-9)
        rows.append(
            {
                "batch_size": batch_size,
                "prompt_tokens": length,
                "new_tokens": new_tokens,
                "prefill_tokens_per_s": batch_size * length / prefill,
                "decode_tokens_per_s": batch_size * new_tokens / decode,
                "prefill_peak_memory_gib": prefill_peak,
                "peak_memory_gib": peak,
            }
        )
    return rows


def training_batch(
    processor, size: tuple[int, int], batch_size: int, device: str, dtype: torch.dtype, image_token_id: int
):
    """One image and a question per row, the image as a TARGET (flow loss) and the text supervised (next-token)."""
    inputs = understanding_inputs(processor, size, batch_size, device, dtype)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == image_token_id, -100)
    roles = torch.full((batch_size,), Tuna2ImageRole.TARGET)
    return {**inputs, "labels": labels, "image_roles": roles, "use_cache": False}


def train_step(model, batch, parameters, device: Device) -> dict:
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    model.train()
    try:
        step()  # warm-up (and the optimizer state)
        seconds, loss, peak = device.timed(step)
    except torch.OutOfMemoryError:
        return {"status": "out of memory"}
    finally:
        model.eval()
    tokens = batch["input_ids"].numel()
    return {"status": "ok", "tokens": tokens, "tokens_per_s": tokens / seconds, "seconds": seconds,
            "peak_memory_gib": peak, "loss": float(loss)}  # fmt: skip


def bench_lora(model, batch, device: Device, rank: int):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=lora_target_modules("all")))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    row = train_step(peft_model, batch, trainable, device)
    row["trainable_parameters"] = sum(p.numel() for p in trainable)
    return row, peft_model.unload()


def bench_full(model, batch, device: Device) -> dict:
    enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    enable()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    row = train_step(model, batch, list(model.parameters()), device)
    getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    row["gradient_checkpointing"] = True
    return row


def markdown(result: dict) -> str:
    meta = result["meta"]

    def gib(value):
        return "n/a" if value is None else f"{value:.1f} GiB"

    lines = [
        f"{meta['date']}, {meta['device_name']}, torch {meta['torch']}, {meta['preset']}, {meta['dtype']}, "
        f"{meta['height']}x{meta['width']}, {meta['steps']} steps; peak memory: {meta['peak_memory']}.",
        "",
        "| what | setting | figure | peak memory |",
        "|---|---|---|---|",
    ]
    for row in result["t2i"]:
        setting = f"{row['attention']}, prefix cache {'on' if row['prefix_cache'] else 'off'}"
        if row["status"] != "ok":
            lines.append(f"| text-to-image | {setting} | {row['status']} | |")
            continue
        figure = f"{row['seconds_per_image']:.3g} s/image, {row['tflops']:.3g} TFLOP/s on span FLOPs"
        if row["seconds_at_peak_flops"] is not None:
            figure += f" (FLOP limit {row['seconds_at_peak_flops']:.3g} s)"
        lines.append(f"| text-to-image | {setting} | {figure} | {gib(row['peak_memory_gib'])} |")
    edit = result["edit"]
    lines.append(f"| editing | sdpa, prefix cache on | {edit['seconds_per_image']:.2f} s/image | "
                 f"{gib(edit['peak_memory_gib'])} |")  # fmt: skip
    for row in result["understanding"]:
        setting = f"batch {row['batch_size']}, {row['prompt_tokens']}-token prompt, {row['new_tokens']} new tokens"
        lines.append(
            f"| understanding | {setting} | prefill {row['prefill_tokens_per_s']:.0f} tok/s, decode "
            f"{row['decode_tokens_per_s']:.1f} tok/s | {gib(row['peak_memory_gib'])} |"
        )
    for key, what in (("lora_sft", "LoRA SFT step"), ("full_sft", "full SFT step")):
        row = result[key]
        if row["status"] != "ok":
            lines.append(f"| {what} | | {row['status']} | |")
            continue
        setting = f"{row['tokens']} tokens" + (", gradient checkpointing" if key == "full_sft" else "")
        if key == "lora_sft":
            setting += f", {row['trainable_parameters'] / 1e6:.1f}M trainable"
        lines.append(
            f"| {what} | {setting} | {row['tokens_per_s']:.0f} tokens/s ({row['seconds']:.2f} s) | "
            f"{gib(row['peak_memory_gib'])} |"
        )
    return "\n".join(lines)


def write_docs(table: str, command: str):
    text = DOCS.read_text()
    block = f"{BEGIN}\nCommand: `{command}`\n\n{table}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n## GPU suite (7B shapes)\n\n" + block + "\n"
    DOCS.write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, 32x48 image, 2 steps, batch sizes 1 and 2")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="bf16 (7B), fp32 (tiny)")
    parser.add_argument("--height", type=int, default=None, help="image height (512; tiny: 32)")
    parser.add_argument("--width", type=int, default=None, help="image width (512; tiny: 48)")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (50; tiny: 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (64; tiny: 4)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--train-batch-size", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense peak of the device for --dtype")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default="gpu_suite.json", help="where to write the figures")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.height = args.height or (32 if args.tiny else 512)
    args.width = args.width or (48 if args.tiny else 512)
    args.steps = args.steps or (2 if args.tiny else 50)
    args.new_tokens = args.new_tokens or (4 if args.tiny else 64)
    args.batch_sizes = (1, 2) if args.tiny else (1, 8)
    dtype = getattr(torch, args.dtype or ("float32" if args.tiny else "bfloat16"))
    device = Device(args.device)
    if device.cuda and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny --device cpu for the small version")
    device_name = torch.cuda.get_device_name() if device.cuda else (platform.processor() or platform.machine())
    peak_tflops = args.peak_tflops
    if peak_tflops is None and device.cuda and dtype == torch.bfloat16:
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, size={"height": args.height, "width": args.width})
    model = random_model("tiny" if args.tiny else "7b", tokenizer, args.device, dtype).eval()
    pipe = Tuna2Pipeline(model=model, processor=processor)
    pipe.set_progress_bar_config(disable=True)

    result = {
        "meta": {
            "date": str(date.today()),
            "device": args.device,
            "device_name": device_name,
            "torch": torch.__version__,
            "preset": "tiny" if args.tiny else "7b (random weights)",
            "dtype": str(dtype).removeprefix("torch."),
            "height": args.height,
            "width": args.width,
            "steps": args.steps,
            "peak_tflops": peak_tflops,
            "peak_memory": "torch.cuda.max_memory_allocated" if device.cuda else "process peak RSS (never decreases)",
        }
    }
    result["t2i"] = bench_t2i(pipe, device, args, peak_tflops)
    result["edit"] = bench_edit(pipe, device, args)
    result["understanding"] = bench_understanding(model, processor, device, args, dtype)
    batch = training_batch(
        processor, (args.height, args.width), args.train_batch_size, args.device, dtype, model.config.image_token_id
    )
    result["lora_sft"], model = bench_lora(model, batch, device, args.lora_rank)
    result["full_sft"] = bench_full(model, batch, device)
    result["memory_7b_weights"] = memory_rows()

    Path(args.json).write_text(json.dumps(result, indent=2))
    table = markdown(result)
    if args.write_docs:
        write_docs(table, "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:] if argv is None else argv))
        print(f"wrote {args.json} and the table into {DOCS}")
    else:
        print(table)
    return result


if __name__ == "__main__":
    main()
