"""What the `tuna2` command, the web app and `examples/sft.py` check in what a user gives them (checkpoint folders or
hub ids, image files) and how they report a problem: one line, `CommandError`. Light to import: torch, transformers
and diffusers are imported inside the functions that need them, so that `tuna2 --help` stays instant."""

import json
import os
import re
from pathlib import Path

# What can be a hub repo id: `name` or `org/name`. Anything else (`./x`, `~/x`, `/x`, `a/b/c`) is a local path.
HUB_ID = re.compile(r"(?![.-])[\w.-]+(/(?![.-])[\w.-]+)?")
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
MODEL_TYPE = "tuna2"  # Tuna2Config.model_type, without importing transformers
MAX_ERROR_LENGTH = 300
# A tokenizer that `AutoProcessor` can build: the fast tokenizer's file, or the BPE files it is built from.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


class CommandError(Exception):
    """A problem to report in one line. Its `__cause__`, when set, is the library error behind it, shown in full by
    `tuna2 --verbose`."""


def first_line(error: Exception) -> str:
    """The first line of an error from a library, whose messages can run over many lines; a first line that ends
    with a colon gets the lines it announces, joined."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        joined = " ".join(lines)
        return joined if len(joined) <= MAX_ERROR_LENGTH else joined[: MAX_ERROR_LENGTH - 3] + "..."
    return lines[0]


def load_image(path: str):
    """The image file at `path`, read into memory (a `PIL.Image.Image`)."""
    import PIL.Image

    if not Path(path).is_file():
        raise CommandError(f"image not found: {path}")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, PIL.Image.DecompressionBombError) as error:
        raise CommandError(f"cannot read image {path}: {error}") from error


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, read at call time (huggingface_hub reads it once, at import)."""
    return any(os.environ.get(name, "").upper() in TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def demo_model() -> str | None:
    """The shipped shapes demo's folder, or None when this installation has none."""
    from diffusers_tuna2.demo import demo_model_path

    try:
        return demo_model_path()
    except FileNotFoundError:
        return None


def resolve_model(model: str | None) -> Path:
    """The checkpoint folder of --model: a local folder, a hub id (downloaded, or taken from the cache when offline),
    or the shapes demo when None. A missing local folder fails at once instead of going through the hub's retries."""
    if model is None:
        demo = demo_model()
        if demo is None:
            raise CommandError("this installation has no shapes demo model; pass --model with a checkpoint folder")
        return Path(demo)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CommandError(f"--model must be a checkpoint folder, not a file: {model}")
    if not HUB_ID.fullmatch(model):
        raise CommandError(f"no such folder: {model}")
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        return Path(snapshot_download(model, local_files_only=offline))
    except Exception as error:  # not on the hub, no network, gated, not in the cache when offline...
        reason = "HF_HUB_OFFLINE is set and the hub cache does not hold it" if offline else first_line(error)
        raise CommandError(f"no such folder: {model} (nor a model on the hub: {reason})") from error


def check_checkpoint(path: Path) -> dict:
    """Reads config.json before loading anything, and returns it: a missing or broken file, another model or a
    missing tokenizer fails in one line (the Auto classes would raise a long error or, with `auto_map`, ask whether
    to trust remote code)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CommandError(f"{path} is not a checkpoint folder: it has no config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CommandError(f"{config_file} is not valid JSON: {error}") from error
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != MODEL_TYPE:
        raise CommandError(f"{path} holds a {model_type!r} model, not a Tuna-2 checkpoint (model_type {MODEL_TYPE!r})")
    if not any(all((path / name).is_file() for name in files) for files in TOKENIZER_FILES):
        raise CommandError(f"{path} has no tokenizer: it needs tokenizer.json (or vocab.json and merges.txt)")
    return config
