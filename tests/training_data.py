"""Small synthetic training sets in the four official jsonl formats, written by the tests."""

import json
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def draw(colour: str, shape: str, size: int = 32) -> PIL.Image.Image:
    image = PIL.Image.new("RGB", (size, size), (255, 255, 255))
    pen = PIL.ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    else:
        pen.rectangle(box, fill=COLOURS[colour])
    return image


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_dataset(root: Path, size: int = 32) -> dict[str, Path]:
    """4 samples per task; returns the jsonl path of each stream (images next to them)."""
    root.mkdir(parents=True, exist_ok=True)
    items = [("red", "circle"), ("green", "square"), ("blue", "circle"), ("yellow", "square")]
    for colour, shape in items:
        draw(colour, shape, size).save(root / f"{colour}_{shape}.png")
    t2i = [{"image": f"{c}_{s}.png", "caption": f"a {c} {s}"} for c, s in items]
    mmu = [
        {
            "image": f"{c}_{s}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": f"A {c} {s}."},
            ],
        }
        for c, s in items
    ]
    edit = [
        {
            "raw_image": f"{c}_{s}.png",
            "out_image": f"{items[(i + 1) % 4][0]}_{s2}.png",
            "instruction": f"make it {items[(i + 1) % 4][0]}",
        }
        for i, ((c, s), s2) in enumerate(zip(items, [items[(i + 1) % 4][1] for i in range(4)]))
    ]
    text = [
        {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
        for question, answer in [
            ("Name a colour.", "Red."),
            ("Name a shape.", "A circle."),
            ("What is two plus two?", "Four."),
            ("Say hello.", "Hello!"),
        ]
    ]
    return {
        "t2i": write_jsonl(root / "t2i.jsonl", t2i),
        "mmu": write_jsonl(root / "mmu.jsonl", mmu),
        "edit": write_jsonl(root / "edit.jsonl", edit),
        "text": write_jsonl(root / "text.jsonl", text),
    }
