"""How fast a small Tuna-2 learns to name the colour of one shape, on a white or on a mid-grey background.

    python examples/shapes/background_check.py --background 255   # white
    python examples/shapes/background_check.py --background 128   # mid-grey (the demo's)

Trains the tiny test configuration (hidden 128, 2 layers) for `--steps` steps of 16 single-shape images with the
question "What colour is the shape?", then prints the greedy accuracy on 30 new images. On white, every patch shares a
large constant input and the patch tokens of different images differ by a few percent after the patch embedding's
RMSNorm; mid-grey is about 0 in the model's pixel space.
"""

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import shapes  # noqa: E402

from transformers_tuna2 import Tuna2ForConditionalGeneration, Tuna2ImageProcessor, Tuna2Processor  # noqa: E402
from tuna2_training.data import Tuna2Collator, Tuna2Sample  # noqa: E402
from tuna2_training.tiny import tiny_config  # noqa: E402
from tuna2_training.tokenizer import train_byte_level_tokenizer  # noqa: E402

QUESTION = "What colour is the shape?"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--background", type=int, default=128, help="grey level of the background, 0-255")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()
    shapes.BACKGROUND = (args.background,) * 3
    rng = random.Random(0)
    torch.manual_seed(0)
    tokenizer = train_byte_level_tokenizer([QUESTION, *shapes.COLOURS, "system user assistant"] * 10, 300)
    processor = Tuna2Processor(Tuna2ImageProcessor(size={"height": shapes.SIZE, "width": shapes.SIZE}), tokenizer)
    model = Tuna2ForConditionalGeneration(tiny_config(tokenizer, use_mask_token=False, understanding_noise_prob=0.0))
    collator = Tuna2Collator(processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)

    def example():
        triple = (rng.choice(list(shapes.COLOURS)), rng.choice(shapes.SHAPES), rng.choice(list(shapes.POSITIONS)))
        item = shapes.random_shape(rng, triple)
        question = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
        return question, item.colour, shapes.render([item])

    model.train()
    for _ in range(args.steps):
        features = []
        for _ in range(16):
            question, colour, image = example()
            messages = [question, {"role": "assistant", "content": colour}]
            features.append({"sample": Tuna2Sample("mmu", "check", messages=messages), "images": [image]})
        model(**collator(features)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    correct = 0
    for _ in range(30):
        question, colour, image = example()
        prompt = processor.apply_chat_template([question], add_generation_prompt=True)
        inputs = processor(text=prompt, images=[image], return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        correct += processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True) == colour
    print(f"background {args.background}: {correct}/30 colours named after {args.steps} steps")


if __name__ == "__main__":
    main()
