"""The `tuna2` command: generate, edit and ask with a Tuna-2 checkpoint (the embedded shapes demo by default), and
convert official checkpoints.

    tuna2 generate "a red circle on the left" -o out.png
    tuna2 edit out.png "make the circle blue" -o edited.png
    tuna2 ask out.png "What colour is the circle?"
    tuna2 convert --checkpoint tuna_2_pixel_7b.pt --tokenizer Qwen2.5-7B-Instruct --output tuna2-7b
    tuna2 init --qwen Qwen2.5-7B-Instruct --output tuna2-7b-init
"""

import argparse
import sys
from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "demo_model"
SCRIPTS = {"convert": "convert an official checkpoint", "init": "start a new Tuna-2 from Qwen2.5"}


class CommandError(Exception):
    """A problem to report in one line."""


def load_image(path: str):
    import PIL.Image

    if not Path(path).is_file():
        raise CommandError(f"image not found: {path}")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, PIL.Image.DecompressionBombError) as error:
        raise CommandError(f"cannot read image {path}: {error}") from error


def resolve_model(model: str | None) -> str:
    if model is not None:
        return model
    if not (DEMO_MODEL / "config.json").is_file():
        raise CommandError(f"the embedded demo model is missing ({DEMO_MODEL}); pass --model")
    return str(DEMO_MODEL)


def settings(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    return device, dtype


def load_pipeline(args):
    from diffusers_tuna2 import Tuna2Pipeline

    device, dtype = settings(args)
    path = resolve_model(args.model)
    if not Path(path).exists() and "/" not in path:
        raise CommandError(f"model not found: {path}")
    return Tuna2Pipeline.from_pretrained(path, dtype=dtype).to(device)


def image_size(args, pipe) -> tuple[int, int]:
    """--size HxW (or a single side), else the processor's fixed size, else 512x512."""
    if args.size:
        height, _, width = args.size.lower().partition("x")
        try:
            return int(height), int(width or height)
        except ValueError:
            raise CommandError(f"--size must look like 512 or 448x576, got {args.size!r}") from None
    size = pipe.processor.image_processor.size
    return (size["height"], size["width"]) if size else (512, 512)


def draw(args, image=None):
    import torch

    pipe = load_pipeline(args)
    height, width = image_size(args, pipe)
    prompt = args.instruction if image is not None else args.prompt
    result = pipe(
        prompt,
        image=image,
        height=height,
        width=width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(args.seed),  # CPU noise, as the official sampler
    ).images[0]
    result.save(args.output)
    print(args.output)


def ask(args):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import transformers_tuna2  # noqa: F401  (registers Tuna-2 with the Auto classes)

    image = load_image(args.image)
    device, dtype = settings(args)
    path = resolve_model(args.model)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    processor = AutoProcessor.from_pretrained(path)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.question}]}
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(device)
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())


def run_script(name: str, argv: list[str]):
    """`tuna2 convert` and `tuna2 init` hand their arguments to the conversion scripts."""
    from diffusers_tuna2.conversion import convert_tuna2_to_hf, init_from_qwen2

    script = convert_tuna2_to_hf if name == "convert" else init_from_qwen2
    script.main(argv)


def add_model_options(parser):
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded demo)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)


def add_generation_options(parser):
    parser.add_argument("-o", "--output", required=True, help="where to write the PNG")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default 3.0, editing 2.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default=None, help="HxW or one side (default: the model's size)")
    add_model_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuna2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="text-to-image")
    generate.add_argument("prompt")
    add_generation_options(generate)
    edit = commands.add_parser("edit", help="edit an image with an instruction")
    edit.add_argument("image")
    edit.add_argument("instruction")
    add_generation_options(edit)
    question = commands.add_parser("ask", help="ask a question about an image")
    question.add_argument("image")
    question.add_argument("question")
    question.add_argument("--max-new-tokens", type=int, default=64)
    add_model_options(question)
    for name, text in SCRIPTS.items():
        commands.add_parser(name, help=f"{text} (its own options: tuna2 {name} --help)", add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv) if not (argv and argv[0] in SCRIPTS) else None
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # keep the terminal for the denoising progress bar and errors
    try:
        if args is None:
            run_script(argv[0], argv[1:])
        elif args.command == "generate":
            draw(args)
        elif args.command == "edit":
            draw(args, load_image(args.image))
        else:
            ask(args)
    except (CommandError, ValueError, OSError) as error:
        print(f"tuna2: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
