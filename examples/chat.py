"""Ask Tuna-2 about an image.

python examples/chat.py --model ./tuna2-7b --image sign.jpg "What is written on the sign?"
"""

import argparse

import PIL.Image
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import transformers_tuna2  # noqa: F401  (registers Tuna-2 with the Auto classes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question")
    parser.add_argument("--model", required=True, help="a Tuna-2 checkpoint folder or hub id")
    parser.add_argument("--image", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, device_map=args.device)
    processor = AutoProcessor.from_pretrained(args.model)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": PIL.Image.open(args.image)},
                {"type": "text", "text": args.question},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True).strip())


if __name__ == "__main__":
    main()
