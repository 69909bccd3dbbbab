"""Text-to-image speed of Tuna2Pipeline: full recompute (like the official pipeline) vs the prefix KV cache.

    python benchmarks/bench_t2i.py                                   # tiny random model, CPU
    python benchmarks/bench_t2i.py --preset 7b --device cuda --dtype bfloat16 --size 512 --steps 50 \\
        --peak-tflops 989                                            # official 7B shapes, random weights

Both modes run on the same weights in one process, with CFG (two branches in one batch) and the official default
negative prompt, or with `--guidance-scale 1` one branch without padding (its cached steps need no attention mask).
Reports seconds per image and per step, and the throughput on the image-span FLOPs (the work a cached step has to
do: the LLM and flow-head layers on the 1 + h*w span tokens of every branch, attention to the whole sequence
included); with --peak-tflops, the fraction of that peak.
"""

import argparse
import platform
import time
from datetime import date

import torch

from diffusers_tuna2 import DEFAULT_NEGATIVE_PROMPT, Tuna2Pipeline
from transformers_tuna2 import Tuna2Config, Tuna2ForConditionalGeneration
from tuna2_training.tiny import build_processor, build_tokenizer, tiny_model


def span_flops(config: Tuna2Config, span: int, context: int) -> float:
    """Multiply-adds x 2 of one branch's image span through the LLM and the flow head, `context` keys before it."""
    text = config.text_config
    d, head_dim = text.hidden_size, text.hidden_size // text.num_attention_heads
    llm_proj = d * (text.num_attention_heads + 2 * text.num_key_value_heads) * head_dim + d * d
    llm_mlp = 3 * d * text.intermediate_size
    llm_attention = 2 * text.num_attention_heads * head_dim * (context + span)
    head_proj = d * (config.flow_head_num_attention_heads + 2 * config.flow_head_num_key_value_heads)
    head_proj = (
        head_proj * config.flow_head_head_dim + config.flow_head_num_attention_heads * config.flow_head_head_dim * d
    )
    head_mlp = 3 * d * config.flow_head_intermediate_size
    head_attention = 2 * config.flow_head_num_attention_heads * config.flow_head_head_dim * (context + span)
    final = d * config.patch_size**2 * config.num_channels
    per_token = text.num_hidden_layers * (llm_proj + llm_mlp + llm_attention)
    per_token += config.flow_head_num_layers * (head_proj + head_mlp + head_attention) + final
    return 2.0 * span * per_token


def random_model(preset: str, tokenizer, device: str, dtype: torch.dtype) -> Tuna2ForConditionalGeneration:
    """The tiny test model, or the official 7B shapes with random N(0, 0.02) weights, on `device` in `dtype`."""
    if preset == "tiny":
        return tiny_model(tokenizer).to(device=device, dtype=dtype)
    config = Tuna2Config.tuna2_7b(
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    with torch.device(device):
        model = Tuna2ForConditionalGeneration(config).to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    return model


def build(preset: str, device: str, dtype: torch.dtype):
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = random_model(preset, tokenizer, device, dtype)
    pipe = Tuna2Pipeline(model=model.eval(), processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--guidance-scale", type=float, default=3.0, help="1.0: no CFG, one branch (its cached steps run unmasked)"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for --dtype")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    pipe = build(args.preset, args.device, dtype)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    kwargs = dict(
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        output_type="latent",
    )
    prompt = "a red fox reading a newspaper on a park bench"
    pipe(prompt, **{**kwargs, "num_inference_steps": 1})  # warm-up
    results = {}
    for mode, use_cache in (("full recompute", False), ("prefix cache", True)):
        sync()
        start = time.perf_counter()
        image = pipe(prompt, generator=torch.Generator().manual_seed(0), use_prefix_cache=use_cache, **kwargs).images
        sync()
        results[mode] = (time.perf_counter() - start, image)
    difference = (results["full recompute"][1].float() - results["prefix cache"][1].float()).abs().max().item()

    cfg = args.guidance_scale != 1.0
    prompts = [prompt, DEFAULT_NEGATIVE_PROMPT] if cfg else [prompt]
    prefixes = pipe.processor.generation_inputs(prompts, args.size, args.size)
    span = pipe.processor.num_span_slots(args.size, args.size)
    flops_per_step = sum(  # every branch (both with CFG), each with its own prefix
        span_flops(pipe.model.config, span, int(length)) for length in prefixes["attention_mask"].sum(1)
    )

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    print(
        f"date {date.today()}, {device_name or platform.machine()}, torch {torch.__version__}, {args.threads} "
        f"threads, preset {args.preset}, {args.dtype}, {args.size}x{args.size}, {args.steps} steps, "
        f"CFG {'on' if cfg else 'off'}"
    )
    for mode, (seconds, _) in results.items():
        line = f"{mode:15s} {seconds:8.3f} s/image  {seconds / args.steps * 1e3:9.2f} ms/step"
        achieved = flops_per_step * args.steps / seconds / 1e12
        line += f"  {achieved:8.4f} TFLOP/s on span FLOPs"
        if args.peak_tflops:
            line += f" ({achieved / args.peak_tflops:.1%} of peak)"
        print(line)
    full, cached = results["full recompute"][0], results["prefix cache"][0]
    print(f"speed-up {full / cached:.2f}x; max abs difference of the final states {difference:.2e}")


if __name__ == "__main__":
    main()
