"""The `tuna2` command: generate, edit and ask with a Tuna-2 checkpoint (by default the shapes demo shipped with the
package), draw where it looks while it reads a question, serve the same in a web app, and convert official checkpoints.

    tuna2 generate "a red circle on the left" -o out.png
    tuna2 edit out.png "make the circle blue" -o edited.png
    tuna2 ask out.png "What colour is the circle?"
    tuna2 attend out.png "What colour is the circle?" -o map.png
    tuna2 app                      # the same in a web page (pip install "tuna2-hf[app]")
    tuna2 convert --checkpoint tuna_2_pixel_7b.pt --tokenizer Qwen2.5-7B-Instruct --output tuna2-7b
    tuna2 init --qwen Qwen2.5-7B-Instruct --output tuna2-7b-init

Errors are one line; --verbose (or TUNA2_VERBOSE=1) also prints the traceback of the library error behind it.
"""

# torch, transformers, diffusers and PIL are imported inside the commands: `tuna2 --help` and argument errors stay
# instant.
import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from diffusers_tuna2 import defaults
from diffusers_tuna2.user_inputs import (
    HUB_ID,
    TRUE_VALUES,
    CommandError,
    check_checkpoint,
    demo_model,
    first_line,
    load_image,
    resolve_model,
)

SCRIPTS = {"convert": "convert an official checkpoint", "init": "start a new Tuna-2 from Qwen2.5"}
VERBOSE_VARIABLE = "TUNA2_VERBOSE"  # set to 1: errors come with their traceback, as with --verbose
# Named in the -o error; any extension PIL can write is accepted.
COMMON_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MIN_OVERLAY_SIDE = 256  # `tuna2 attend` enlarges smaller overlays (the demo's scenes are 48x48) by a whole factor
MAX_PORT = 65535
LORA_ADAPTER = "lora"  # the adapter name of --lora
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds


# ---------------------------------------------------------------------------------------------------- checking input


def check_output(path: str):
    """Fails before anything is loaded when the image could not be written: no such folder, or not an image name."""
    import PIL.Image

    output = Path(path)
    if output.is_dir():
        raise CommandError(f"-o {path} is a folder; give an image file name, such as {output / 'out.png'}")
    if not output.parent.is_dir():
        raise CommandError(f"-o {path}: no such folder: {output.parent}")
    extensions = PIL.Image.registered_extensions()  # also loads the plugins, which fill PIL.Image.SAVE
    writable = {ext for ext, image_format in extensions.items() if image_format in PIL.Image.SAVE}
    if output.suffix.lower() not in writable:
        common = ", ".join(ext for ext in COMMON_EXTENSIONS if ext in writable)
        problem = f"{output.suffix!r} is not an image extension" if output.suffix else "no image extension"
        raise CommandError(f"-o {path}: {problem}; use {common}")
    existed = output.exists()
    try:  # the folder may refuse files (permissions, a read-only or virtual file system): find out before the work
        with open(output, "ab"):
            pass
    except OSError as error:
        raise CommandError(f"-o {path}: cannot write there: {error.strerror or error}") from error
    if not existed:
        output.unlink()


def parse_size(size: str | None) -> tuple[int, int] | None:
    """--size HxW, or one side for a square."""
    if size is None:
        return None
    height, _, width = size.lower().partition("x")
    try:
        return int(height), int(width or height)
    except ValueError:
        raise CommandError(f"--size must look like 512 or 448x576, got {size!r}") from None


def check_text(text: str, name: str):
    if not text.strip():
        raise CommandError(f"the {name} is empty; say what you want, as in the examples of tuna2 --help")


def check_device(device: str | None):
    """--device names a device torch knows, and one this machine has, before anything is loaded."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise CommandError(f"--device {device!r} is not a device; use cpu, cuda, cuda:1, mps...") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: this machine has no CUDA device (torch sees none); use --device cpu")


def check_sampling(args):
    """--steps, --guidance and --seed, checked before anything is loaded."""
    if args.steps < 1:
        raise CommandError(f"--steps must be a whole number >= 1, got {args.steps}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise CommandError(f"--guidance must be a finite number >= 0 (1 turns guidance off), got {args.guidance}")
    if not 0 <= args.seed <= MAX_SEED:
        raise CommandError(f"--seed must be between 0 and 2**64 - 1, got {args.seed}")


def fixed_size(path: Path) -> tuple[int, int] | None:
    """The fixed `(height, width)` of the checkpoint's image processor (a model trained at one size), read from its
    JSON; None when it resizes to buckets."""
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        file = path / name
        if file.is_file():
            try:
                config = json.loads(file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                return None  # loading reports it
            size = (config.get(key) or {}) if key else config
            size = size.get("size") if isinstance(size, dict) else None
            if isinstance(size, dict) and "height" in size and "width" in size:
                return int(size["height"]), int(size["width"])
            return None
    return None


def check_size(size: tuple[int, int] | None, config: dict, path: Path, editing: bool):
    """--size against what the checkpoint's config.json says the model takes, before it is loaded; a size other than
    the one a fixed-size checkpoint was trained at is allowed, with a warning."""
    if size is None:
        return
    height, width = size
    patch_size = config.get("patch_size", 16)
    if height <= 0 or width <= 0 or height % patch_size or width % patch_size:
        raise CommandError(
            f"--size {height}x{width}: both sides must be positive multiples of the patch size {patch_size}"
        )
    from transformers_tuna2.processing_tuna2 import generation_length, span_slots

    needed = generation_length(span_slots(height, width, patch_size), editing)
    max_positions = (config.get("text_config") or {}).get("max_position_embeddings")
    if max_positions is not None and needed > max_positions:
        raise CommandError(
            f"--size {height}x{width} needs {needed} positions; this model takes {max_positions}: use a smaller --size"
        )
    trained = fixed_size(path)
    if trained is not None and trained != size:
        print(
            f"tuna2: warning: this model was trained at {trained[0]}x{trained[1]} only; at --size {height}x{width} "
            "its images may be wrong",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------------------------------------- loading


def settings(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    return device, dtype


def model_folder(args) -> Path:
    """The checked checkpoint folder of --model, found before the heavy imports: a typo fails at once."""
    path = resolve_model(args.model)
    check_checkpoint(path)
    return path


@contextlib.contextmanager
def load_report_held():
    """Holds back transformers' load report (a table of weights) until loading succeeds: when loading fails, the
    one-line error says it all."""
    from transformers.utils import logging as transformers_logging

    logger = transformers_logging.get_logger("transformers.modeling_utils")
    held = []

    def hold(record):
        held.append(record)
        return False

    logger.addFilter(hold)
    try:
        yield
    finally:
        logger.removeFilter(hold)
    for record in held:
        logger.handle(record)


def load(load_from: Callable, path: Path, device: str | None = None):
    """`load_from(path)`, moved to `device`; whatever a damaged checkpoint raises (weights, tokenizer or processor
    files) is reported in one line."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Keep the terminal for the denoising progress bar and errors.
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        with load_report_held():
            loaded = load_from(path)
    except Exception as error:
        reason = first_line(error)
        if "ignore_mismatched_sizes" in reason:  # transformers' advice names an option of from_pretrained
            reason = "its weights do not have the shapes that its config.json gives them (an edited config.json?)"
        raise CommandError(f"cannot load the checkpoint in {path}: {reason}") from error
    if device is None:
        return loaded
    try:
        return loaded.to(device)
    except (RuntimeError, AssertionError) as error:  # no such device, or torch built without it
        raise CommandError(f"cannot use device {device!r}: {first_line(error)}") from error


# ---------------------------------------------------------------------------------------------------- commands


def check_lora(args):
    """--lora and --lora-scale, before anything is loaded: PEFT is installed, and a local LoRA exists."""
    if args.lora is None:
        if args.lora_scale is not None:
            raise CommandError("--lora-scale weighs a LoRA: pass it with --lora PATH")
        return
    if args.lora_scale is None:
        args.lora_scale = defaults.LORA_SCALE
    if not math.isfinite(args.lora_scale):
        raise CommandError(f"--lora-scale must be a finite number, got {args.lora_scale}")
    if importlib.util.find_spec("peft") is None:
        raise CommandError('--lora needs PEFT: pip install peft (or "tuna2-hf[train]")')
    path = Path(args.lora).expanduser()
    if not path.exists() and not HUB_ID.fullmatch(args.lora):
        raise CommandError(f"--lora {args.lora}: no such file or folder")


def load_lora(pipe, args):
    """Loads --lora into the pipeline the documented way (`load_lora_weights`: a diffusers-format file or folder, or
    a PEFT adapter folder) and weighs it by --lora-scale."""
    if args.lora is None:
        return
    try:
        pipe.load_lora_weights(args.lora, adapter_name=LORA_ADAPTER)
    except Exception as error:
        raise CommandError(f"cannot load the LoRA {args.lora}: {first_line(error)}") from error
    if args.lora_scale != 1.0:
        pipe.set_adapters(LORA_ADAPTER, adapter_weights=args.lora_scale)


def draw(args, editing: bool = False):
    check_text(args.instruction if editing else args.prompt, "instruction" if editing else "prompt")
    check_sampling(args)
    check_lora(args)
    check_output(args.output)
    size = parse_size(args.size)
    image = load_image(args.image) if editing else None
    path = resolve_model(args.model)
    check_size(size, check_checkpoint(path), path, editing)
    check_device(args.device)
    import torch

    from diffusers_tuna2 import Tuna2Pipeline

    device, dtype = settings(args)
    pipe = load(lambda path: Tuna2Pipeline.from_pretrained(path, dtype=dtype), path, device)
    load_lora(pipe, args)
    height, width = size or (None, None)  # the pipeline's default: the processor's fixed size, else 512x512
    result = pipe(
        args.instruction if editing else args.prompt,
        image=image,
        height=height,
        width=width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        sampling_method=args.sampler,
        generator=torch.Generator("cpu").manual_seed(args.seed),  # CPU noise, as the official sampler
    ).images[0]
    result.save(args.output)
    print(args.output)


def load_understanding(args):
    """The model and processor of --model, for `ask` and `attend`."""
    path = model_folder(args)
    check_device(args.device)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import transformers_tuna2  # noqa: F401  (registers Tuna-2 with the Auto classes)

    device, dtype = settings(args)
    # trust_remote_code=False: the registered classes load the checkpoint, its `auto_map` code never runs, and
    # transformers never stops to ask.
    model = load(
        lambda path: AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, trust_remote_code=False),
        path,
        device,
    )
    processor = load(lambda path: AutoProcessor.from_pretrained(path, trust_remote_code=False), path)
    return model, processor, device


def ask(args):
    check_text(args.question, "question")
    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be a whole number >= 1, got {args.max_new_tokens}")
    image = load_image(args.image)
    model, processor, device = load_understanding(args)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.question}]}
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(device)
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())


def attend(args):
    """Writes the overlay of the attention map of the question over the image."""
    check_text(args.question, "question")
    check_output(args.output)
    image = load_image(args.image)
    from transformers_tuna2.attention_maps import parse_layers

    if args.scale is not None and args.scale < 1:
        raise CommandError(f"--scale must be a whole factor >= 1, got {args.scale}")
    layers = None
    if args.layers is not None and args.layers.strip().lower() != "all":
        try:
            layers = parse_layers(args.layers)
        except ValueError as error:
            raise CommandError(f"--layers: {error}") from error
    model, processor, _ = load_understanding(args)
    from transformers_tuna2 import attention_maps

    try:
        result = attention_maps(model, processor, image, args.question, layers=layers, target=args.target)
    except ValueError as error:
        option = "--layers" if "layer" in str(error) else "--target" if args.target is not None else None
        raise CommandError(f"{option}: {error}" if option else str(error)) from error
    (seen,) = result.images
    scale = args.scale or max(1, -(-MIN_OVERLAY_SIDE // max(seen.size)))
    result.overlays(scale=scale)[0].save(args.output)
    print(args.output)


def app(args):
    """Serves the web app until interrupted. Gradio is checked first: a missing extra fails before the model loads."""
    try:
        from diffusers_tuna2 import app as web_app
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        raise CommandError('the app needs Gradio: pip install "tuna2-hf[app]"') from error
    if args.port is not None and not 1 <= args.port <= MAX_PORT:
        raise CommandError(f"--port must be between 1 and {MAX_PORT}, got {args.port}")
    path = model_folder(args)
    check_device(args.device)
    from diffusers_tuna2 import Tuna2Pipeline

    device, dtype = settings(args)
    pipe = load(lambda path: Tuna2Pipeline.from_pretrained(path, dtype=dtype), path, device)
    pipe.set_progress_bar_config(disable=True)  # the page shows the denoising progress
    try:
        web_app.launch(web_app.build_app(pipe), port=args.port, share=args.share)
    except OSError as error:  # a port Gradio cannot bind; its message names its own launch() parameters
        if args.port is None:
            raise
        raise CommandError(
            f"cannot serve on port {args.port}: it is in use or not allowed; pass another --port"
        ) from error


def run_script(name: str, argv: list[str]) -> int:
    """`tuna2 convert` and `tuna2 init` hand their arguments to the converters, which report their errors."""
    from diffusers_tuna2 import conversion

    script = conversion.convert_main if name == "convert" else conversion.init_main
    return script(argv, prog=f"tuna2 {name}")


# ---------------------------------------------------------------------------------------------------- parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and ends each option's help with its default (options defaulting to None say
    what that means themselves)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if action.option_strings and shown and "(default" not in text:
            text += " (default: %(default)s)"
        return text


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tuna2-hf")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def add_model_options(parser):
    # The help says what this installation has: the package may ship without the demo.
    default = "default: the shapes demo shipped with the package" if demo_model() else "required: no demo is installed"
    parser.add_argument("--model", default=None, help=f"Tuna-2 checkpoint folder, or a hub id ({default})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps... (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="dtype of the weights (default: bfloat16 on cuda, else float32)",
    )


def add_generation_options(parser, default_guidance: float, default_guidance_tuna_r: float):
    parser.add_argument(
        "-o", "--output", required=True, help="image file to write; its extension sets the format (required)"
    )
    parser.add_argument("--steps", type=int, default=defaults.NUM_INFERENCE_STEPS, help="denoising steps")
    parser.add_argument(
        "--sampler",
        choices=("euler", "heun"),
        default=None,
        help="denoising sampler (default: the checkpoint's, officially euler for Tuna-2, heun for Tuna-R)",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"classifier-free guidance scale (default: the checkpoint's, officially {default_guidance} for Tuna-2, "
        f"{default_guidance_tuna_r} for Tuna-R)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    demo = demo_model()
    demo_size = fixed_size(Path(demo)) if demo else None
    shown = f", {demo_size[0]}x{demo_size[1]} for the shapes demo" if demo_size else ""
    parser.add_argument(
        "--lora",
        default=None,
        help="LoRA to apply: a folder or file from examples/sft.py or save_lora_weights (default: none)",
    )
    parser.add_argument(
        "--lora-scale",
        type=float,
        default=None,
        help=f"weight of the --lora adapter, 0 turns it off (default: {defaults.LORA_SCALE})",
    )
    parser.add_argument(
        "--size",
        default=None,
        help=f"HxW, or one side for a square (default: the size the model was trained at{shown}; for a model "
        f"trained on buckets, {defaults.IMAGE_SIZE})",
    )
    add_model_options(parser)


def add_command(commands, name: str, text: str, run: Callable) -> argparse.ArgumentParser:
    """A subcommand `name` whose arguments `run(args)` receives; every subcommand takes --verbose."""
    command = commands.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
    command.set_defaults(run=run)
    command.add_argument(
        "--verbose",
        action="store_true",
        help="on an error, also print its traceback and the library error behind it "
        f"(default: off; {VERBOSE_VARIABLE}=1 turns it on too)",
    )
    return command


def add_drawing_commands(commands):
    command = add_command(commands, "generate", "text-to-image", lambda args: draw(args, editing=False))
    command.add_argument("prompt", help="what to draw")
    add_generation_options(command, defaults.GUIDANCE_SCALE, defaults.TUNA_R_GUIDANCE_SCALE)
    command = add_command(commands, "edit", "edit an image with an instruction", lambda args: draw(args, editing=True))
    command.add_argument("image", help="image to edit")
    command.add_argument("instruction", help="the edit")
    add_generation_options(command, defaults.EDIT_GUIDANCE_SCALE, defaults.TUNA_R_EDIT_GUIDANCE_SCALE)


def add_ask_command(commands):
    command = add_command(commands, "ask", "ask a question about an image", ask)
    command.add_argument("image", help="image to ask about")
    command.add_argument("question", help="the question")
    command.add_argument(
        "--max-new-tokens", type=int, default=defaults.MAX_NEW_TOKENS, help="longest answer, in tokens"
    )
    add_model_options(command)


def add_attend_command(commands):
    command = add_command(
        commands, "attend", "write where the model looks in an image while it reads a question", attend
    )
    command.add_argument("image", help="image to ask about")
    command.add_argument("question", help="the question")
    command.add_argument(
        "-o", "--output", required=True, help="overlay image to write; its extension sets the format (required)"
    )
    command.add_argument(
        "--layers",
        default=None,
        help="language-model layers to average: 3, 0,2, 4-7 or all (default: all, as the official script)",
    )
    command.add_argument(
        "--target", default=None, help="read only this word's tokens of the question (default: the whole question)"
    )
    command.add_argument(
        "--scale",
        type=int,
        default=None,
        help=f"enlarge the overlay by this factor (default: enough for {MIN_OVERLAY_SIDE} pixels)",
    )
    add_model_options(command)


def add_app_command(commands):
    command = add_command(commands, "app", "ask, generate and edit in a web page (needs the [app] extra)", app)
    command.add_argument(
        "--port", type=int, default=None, help="port to serve on (default: 7860, or the next free one)"
    )
    command.add_argument(
        "--share", action="store_true", help="also serve through a temporary public gradio.live link (default: off)"
    )
    add_model_options(command)


def add_bench_images_command(commands):
    from diffusers_tuna2 import bench_images

    text = "write the images of GenEval, DPG-Bench or ImgEdit from their prompt files, as their evaluators read them"
    bench_images.add_arguments(add_command(commands, "bench-images", text, bench_images.bench_images))


# Each adds its subcommands to the parser's; a new subcommand is a function here, whose `add_command` names what
# runs it.
COMMANDS = (
    add_drawing_commands,
    add_ask_command,
    add_attend_command,
    add_app_command,
    add_bench_images_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuna2", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_commands in COMMANDS:
        add_commands(commands)
    for name, text in SCRIPTS.items():
        commands.add_parser(name, help=f"{text} (its own options: tuna2 {name} --help)", add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SCRIPTS:
        return run_script(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CommandError, ValueError, OSError) as error:
        if args.verbose or os.environ.get(VERBOSE_VARIABLE, "").upper() in TRUE_VALUES:
            traceback.print_exception(error)  # with the library error it was raised from
        print(f"tuna2: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tuna2: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    return 0


if __name__ == "__main__":
    sys.exit(main())
