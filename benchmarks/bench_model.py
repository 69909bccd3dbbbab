"""Forward and generate time of a tiny Tuna-2 on CPU.

    python benchmarks/bench_model.py [--threads 2] [--repeats 5]

Tiny config (tuna2_training.tiny): LLM hidden 128, 2 layers; flow head 2 blocks; one 256x256 image (256 patches) plus a
short chat prompt. Reports the median of `--repeats` runs of: an understanding forward (LLM + lm_head), an x0
prediction (LLM + flow head), and greedy `generate()` of 32 new tokens with the KV cache.
"""

import argparse
import platform
import statistics
import time
from datetime import date

import torch

from transformers_tuna2 import Tuna2ImageRole
from tuna2_training.tiny import build_processor, build_tokenizer, tiny_model


def median_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, size={"height": 256, "width": 256})
    model = tiny_model(tokenizer)
    image = torch.randint(0, 256, (256, 256, 3), dtype=torch.uint8).numpy()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour is the shape?"}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    length = inputs.input_ids.shape[1]
    new_tokens = 32

    with torch.inference_mode():
        forward = median_seconds(lambda: model(**inputs), args.repeats)
        as_target = {"timesteps": torch.tensor([0.5]), "image_roles": torch.tensor([Tuna2ImageRole.TARGET])}
        x0 = median_seconds(lambda: model(**inputs, **as_target), args.repeats)
        generate = median_seconds(
            lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False),
            args.repeats,
        )

    print(
        f"date {date.today()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, sequence {length} tokens, fp32"
    )
    print(f"forward (LLM + lm_head):       {forward * 1e3:8.2f} ms")
    print(f"forward, x0 (LLM + flow head): {x0 * 1e3:8.2f} ms")
    print(
        f"generate {new_tokens} tokens (cache):  {generate * 1e3:8.2f} ms  "
        f"({new_tokens / generate:.0f} tokens/s after a {length}-token prefill)"
    )


if __name__ == "__main__":
    main()
