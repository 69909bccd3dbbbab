"""The shapes demo model shipped inside the package: a small Tuna-2 trained on synthetic shapes (see docs/demo.md)."""

from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "demo_model"


def demo_model_path() -> str:
    """The folder of the shipped shapes demo, for `Tuna2Pipeline.from_pretrained`, `AutoModelForImageTextToText`
    and `AutoProcessor`.

    Raises:
        `FileNotFoundError`: when the package was installed without the demo's files.
    """
    if not (DEMO_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the shapes demo model is missing from the package ({DEMO_MODEL})")
    return str(DEMO_MODEL)
