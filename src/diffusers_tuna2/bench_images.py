"""`tuna2 bench-images`: the images of the generation and editing benchmarks, from their own prompt files, in the
folder layout their evaluators read.

    tuna2 bench-images geneval evaluation_metadata.jsonl -o geneval-images       # GenEval
    tuna2 bench-images dpg dpg_bench/prompts -o dpg-images                       # DPG-Bench
    tuna2 bench-images imgedit basic_edit.json --images Benchmark/singleturn -o imgedit-images   # ImgEdit

Layouts:

- GenEval: `<index:05d>/metadata.jsonl` (the prompt's line of the metadata file) and `<index:05d>/samples/<n:04d>.png`
  for each of `--samples` images, as GenEval's README lays out the folder its evaluator reads;
- DPG-Bench: `<prompt file name>.png`, a 2x2 grid of 4 samples (DPG-Bench's evaluator cuts the grid into 4);
- ImgEdit: `<key>.png` per instruction of the JSON file, its source image read from `--images`.

Finished prompts are skipped on a second run (each file is written whole, by a rename, and a prompt's files in a fixed
order), so an interrupted run resumes where it stopped. Sample `n` of the prompt at position `i` of the file is seeded
with `seed + i * samples + n`, whatever was finished before; `seeds.jsonl` records the seeds of every finished prompt.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from diffusers_tuna2 import cli, defaults

FORMATS = ("geneval", "dpg", "imgedit")
SAMPLES = {"geneval": 4, "dpg": 4, "imgedit": 1}  # the evaluators' own counts
DPG_GRID = 2  # DPG-Bench reads a 2x2 grid of 4 samples per prompt
SEEDS_LOG = "seeds.jsonl"


@dataclass
class BenchPrompt:
    """One prompt of a benchmark file: `name` identifies its output (folder index, file stem or key), `position` is its
    place in the file (it sets the seeds), `source` the image to edit (ImgEdit)."""

    name: str
    position: int
    prompt: str
    metadata: str | None = None
    source: Path | None = None
    seeds: list[int] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- reading prompts


def read_geneval(path: Path) -> list[BenchPrompt]:
    """GenEval's metadata file: one JSON object with a `prompt` per line, kept as written for the evaluator."""
    prompts = []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for index, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise cli.CommandError(f"{path}, line {index + 1}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise cli.CommandError(f'{path}, line {index + 1}: a GenEval metadata line needs a "prompt" string')
        prompts.append(BenchPrompt(f"{index:05d}", index, record["prompt"], metadata=line))
    return prompts


def read_dpg(path: Path) -> list[BenchPrompt]:
    """DPG-Bench's prompt folder: one `<name>.txt` per prompt, in name order."""
    if not path.is_dir():
        raise cli.CommandError(f"{path}: DPG-Bench prompts are a folder of .txt files")
    files = sorted(path.glob("*.txt"))
    return [
        BenchPrompt(file.stem, index, file.read_text(encoding="utf-8").strip()) for index, file in enumerate(files)
    ]


def read_imgedit(path: Path, images: Path) -> list[BenchPrompt]:
    """ImgEdit's instruction file: `{key: {"id": source image path under `images`, "prompt": instruction, ...}}`."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise cli.CommandError(f"{path}: not JSON ({error.msg})") from None
    if not isinstance(records, dict):
        raise cli.CommandError(f'{path}: an ImgEdit file maps instruction keys to {{"id", "prompt"}} records')
    prompts = []
    for index, (key, record) in enumerate(records.items()):
        if not isinstance(record, dict) or not {"id", "prompt"} <= set(record):
            raise cli.CommandError(f'{path}: instruction {key!r} needs "id" (the source image) and "prompt"')
        prompts.append(BenchPrompt(str(key), index, record["prompt"], source=images / record["id"]))
    return prompts


def read_prompts(benchmark: str, path: Path, images: Path | None) -> list[BenchPrompt]:
    if not path.exists():
        raise cli.CommandError(f"no such file or folder: {path}")
    if benchmark == "geneval":
        return read_geneval(path)
    if benchmark == "dpg":
        return read_dpg(path)
    return read_imgedit(path, images if images is not None else path.parent)


# ------------------------------------------------------------------------------------------------- writing images


def outputs_of(benchmark: str, output: Path, item: BenchPrompt, samples: int) -> list[Path]:
    """The files a finished prompt has, the last one written last."""
    if benchmark == "geneval":
        folder = output / item.name
        return [*(folder / "samples" / f"{n:04d}.png" for n in range(samples)), folder / "metadata.jsonl"]
    return [output / f"{item.name}.png"]


def save_whole(write, path: Path):
    """`write(temporary_path)`, then a rename: an interrupted run leaves no half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def grid(images: list, columns: int):
    """Images of one size side by side, `columns` per row."""
    import PIL.Image

    width, height = images[0].size
    rows = -(-len(images) // columns)
    canvas = PIL.Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        canvas.paste(image, ((index % columns) * width, (index // columns) * height))
    return canvas


def write_prompt(benchmark: str, output: Path, item: BenchPrompt, images: list, samples: int):
    paths = outputs_of(benchmark, output, item, samples)
    if benchmark == "geneval":
        for image, path in zip(images, paths):
            save_whole(image.save, path)
        save_whole(lambda partial: partial.write_text(item.metadata + "\n", encoding="utf-8"), paths[-1])
    elif benchmark == "dpg":
        save_whole(grid(images, DPG_GRID).save, paths[0])
    else:
        save_whole(images[0].save, paths[0])


def write_seeds_log(output: Path, done: list[BenchPrompt]):
    """`seeds.jsonl`: the name, prompt and seeds of every finished prompt, in the order of the prompt file."""
    lines = [json.dumps({"name": item.name, "prompt": item.prompt, "seeds": item.seeds}) for item in done]
    save_whole(
        lambda partial: partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8"),
        output / SEEDS_LOG,
    )


def finished(benchmark: str, output: Path, item: BenchPrompt, samples: int) -> bool:
    return all(path.is_file() for path in outputs_of(benchmark, output, item, samples))


# ------------------------------------------------------------------------------------------------- the command


def batches(items: list[BenchPrompt], prompts_per_batch: int):
    for start in range(0, len(items), prompts_per_batch):
        yield items[start : start + prompts_per_batch]


def bench_images(args):
    """Generates the images of every unfinished prompt of the benchmark file, `--batch-size` images per call."""
    samples = args.samples or SAMPLES[args.benchmark]
    if args.benchmark == "dpg" and samples != DPG_GRID**2:
        raise cli.CommandError(f"--samples: DPG-Bench reads a {DPG_GRID}x{DPG_GRID} grid, so it takes {DPG_GRID**2}")
    if args.benchmark == "imgedit" and samples != 1:
        raise cli.CommandError("--samples: ImgEdit reads one edited image per instruction")
    if samples < 1:
        raise cli.CommandError(f"--samples must be a whole number >= 1, got {samples}")
    if args.batch_size < 1:
        raise cli.CommandError(f"--batch-size must be a whole number >= 1, got {args.batch_size}")
    cli.check_sampling(args)
    size = cli.parse_size(args.size)
    items = read_prompts(args.benchmark, Path(args.prompts), Path(args.images) if args.images else None)
    if args.limit is not None:
        items = items[: args.limit]
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise cli.CommandError(f"-o {args.output} is a file; give a folder for the images")
    path = cli.resolve_model(args.model)
    cli.check_size(size, cli.check_checkpoint(path), path, editing=args.benchmark == "imgedit")
    cli.check_device(args.device)
    for item in items:
        item.seeds = [args.seed + item.position * samples + n for n in range(samples)]
    done = [item for item in items if finished(args.benchmark, output, item, samples)]
    todo = [item for item in items if item not in done]
    print(f"{len(items) - len(todo)} of {len(items)} prompts already done in {output}", flush=True)
    if not todo:
        return
    missing = [item.source for item in todo if item.source is not None and not item.source.is_file()]
    if missing:
        raise cli.CommandError(f"source image not found: {missing[0]} (pass --images, the folder the ids are under)")

    import torch
    from tqdm.auto import tqdm

    from diffusers_tuna2 import Tuna2Pipeline

    device, dtype = cli.settings(args)
    pipe = cli.load(lambda path: Tuna2Pipeline.from_pretrained(path, dtype=dtype), path, device)
    pipe.set_progress_bar_config(disable=True)
    output.mkdir(parents=True, exist_ok=True)
    height, width = size or (None, None)  # the pipeline's default: the processor's fixed size, else 512x512
    prompts_per_batch = max(1, args.batch_size // samples)
    with tqdm(total=len(todo), desc=f"bench-images {args.benchmark}", unit="prompt") as progress:
        for batch in batches(todo, prompts_per_batch):
            sources = [cli.load_image(str(item.source)) for item in batch] if args.benchmark == "imgedit" else None
            images = pipe(
                [item.prompt for item in batch],
                image=sources,
                height=height,
                width=width,
                num_images_per_prompt=samples,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=[torch.Generator("cpu").manual_seed(seed) for item in batch for seed in item.seeds],
            ).images
            for index, item in enumerate(batch):
                write_prompt(args.benchmark, output, item, images[index * samples : (index + 1) * samples], samples)
                done = sorted([*done, item], key=lambda item: item.position)
                write_seeds_log(output, done)
                progress.update()
    print(output)


def add_arguments(command):
    """The arguments of `tuna2 bench-images`."""
    command.add_argument("benchmark", choices=FORMATS, help="the prompt file's benchmark")
    command.add_argument(
        "prompts",
        help="GenEval: evaluation_metadata.jsonl; DPG-Bench: the prompts folder; ImgEdit: the instruction JSON file",
    )
    command.add_argument("-o", "--output", required=True, help="folder to write the images to (required)")
    command.add_argument(
        "--images", default=None, help="ImgEdit: the folder the source image ids are under (default: the JSON's)"
    )
    command.add_argument(
        "--samples", type=int, default=None, help="images per prompt (default: GenEval 4, DPG-Bench 4, ImgEdit 1)"
    )
    command.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    command.add_argument("--limit", type=int, default=None, help="only the first prompts of the file")
    command.add_argument("--steps", type=int, default=defaults.NUM_INFERENCE_STEPS, help="denoising steps")
    command.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"guidance scale (default: the checkpoint's, officially {defaults.GUIDANCE_SCALE}, "
        f"{defaults.EDIT_GUIDANCE_SCALE} for editing)",
    )
    command.add_argument("--seed", type=int, default=0, help="seed of the first sample; each next sample adds one")
    command.add_argument(
        "--size",
        default=None,
        help=f"HxW, or one side for a square (default: the size the model was trained at, else {defaults.IMAGE_SIZE})",
    )
    cli.add_model_options(command)
