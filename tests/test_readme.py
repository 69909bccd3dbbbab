"""The snippets of the README and of docs/*.md: the README's Python examples on a tiny checkpoint, and every snippet of
every document, run as written on the shipped demo unless the text right above it says what it needs."""

import importlib.util
import json
import logging
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import pytest
import torch
from transformers.utils import logging as transformers_logging

import diffusers_tuna2
from diffusers_tuna2 import cli
from tuna2_training.tiny import build_processor, tiny_model

README = Path(__file__).parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path, tokenizer):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "apply_chat_template" in block)
    tiny_model(tokenizer).save_pretrained(tmp_path)
    build_processor(tokenizer, size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    namespace = {"path": str(tmp_path), "img": PIL.Image.new("RGB", (64, 48), "orange")}
    exec(compile(example, "README.md", "exec"), namespace)
    assert isinstance(namespace["answer"], str)
    assert namespace["inputs"].input_ids.shape[1] > 5 + 1 + 4  # system prompt, time slot and 4 patches at least


def test_chat_example_script(tmp_path, tokenizer):
    import subprocess
    import sys

    tiny_model(tokenizer).save_pretrained(tmp_path / "model")
    build_processor(tokenizer, size={"height": 32, "width": 32}).save_pretrained(tmp_path / "model")
    PIL.Image.new("RGB", (40, 30), "teal").save(tmp_path / "image.png")
    script = Path(__file__).parents[1] / "examples" / "chat.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--model",
            str(tmp_path / "model"),
            "--image",
            str(tmp_path / "image.png"),
            "--max-new-tokens",
            "4",
            "What colour is it?",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.endswith("\n")  # the decoded answer (random weights: any text) was printed


def test_readme_pipeline_example_runs(tmp_path, tokenizer):
    from diffusers_tuna2 import Tuna2Pipeline

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "Tuna2Pipeline.from_pretrained" in block)
    processor = build_processor(tokenizer, size={"height": 64, "width": 48})  # the default size of generated images
    Tuna2Pipeline(model=tiny_model(tokenizer), processor=processor).save_pretrained(tmp_path)
    namespace = {"path": str(tmp_path), "dtype": torch.float32, "device": "cpu"}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["image"].size == (48, 64) and namespace["edited"].size == (48, 64)


def test_readme_batch_of_two_conversations(tmp_path, tokenizer):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    single = next(block for block in blocks if "apply_chat_template" in block)
    batched = next(block for block in blocks if "conversations = [" in block)
    tiny_model(tokenizer).save_pretrained(tmp_path)
    build_processor(tokenizer, size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    img, img2 = PIL.Image.new("RGB", (64, 48), "orange"), PIL.Image.new("RGB", (40, 40), "navy")
    namespace = {"path": str(tmp_path), "img": img, "img2": img2}
    logger = transformers_logging.get_logger("transformers")
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        exec(compile(single + batched, "README.md", "exec"), namespace)
    finally:
        logger.removeHandler(handler)
    # The batch is written as transformers 5 wants its options: no "Kwargs passed to processor.__call__..." warning.
    assert [record.getMessage() for record in records] == []
    model, processor = namespace["model"], namespace["processor"]
    for conversation, answer in zip(namespace["conversations"], namespace["answers"]):
        inputs = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        alone = model.generate(**inputs, max_new_tokens=8)[0, inputs.input_ids.shape[1] :]
        assert answer == processor.decode(alone, skip_special_tokens=True)


def test_readme_one_forward_example_runs(tokenizer, processor, model):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "Tuna2Cache(" in block)
    namespace = {"model": model, "processor": processor}
    with torch.no_grad():
        exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["x0"].shape == (1, 3, 512, 512)
    cache, layout = namespace["cache"], namespace["layout"]
    assert cache.language_model.get_seq_length() == cache.flow_head.get_seq_length() == layout["input_ids"].shape[1]


# ---------------------------------------------------------------------------------------------------- every snippet

ROOT = Path(__file__).parents[1]
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# A snippet is not run when the paragraph right above it says why, in one of these words.
NOT_RUN = re.compile(
    r"needs a full checkpoint|needs a GPU|needs the network|serves until interrupted|runs the whole test suite"
    r"|is long",
    re.I,
)
# The snippets the documents say not to run, by document and the start of their first line: a snippet newly marked
# must be added here.
MARKED = {
    ("README.md", "python examples/chat.py --model ./tuna2-7b"),
    ("README.md", 'tuna2 generate "a red fox reading a newspaper"'),
    ("README.md", "python conversion/convert_tuna2_to_hf.py"),
    ("README.md", 'pip install ".[train]"'),
    ("README.md", "import torch\nfrom transformers_tuna2 import Tuna2Cache"),
    ("README.md", 'pipe = Tuna2Pipeline.from_pretrained("./tuna2-7b")'),
    ("README.md", 'pip install ".[test]"'),
    ("app.md", 'pip install ".[app]"'),
    ("evaluation.md", "lmms-eval --model tuna2"),
    ("evaluation.md", "tuna2 bench-images geneval geneval/prompts"),
    ("evaluation.md", "tuna2 bench-images dpg ELLA"),
    ("evaluation.md", "tuna2 bench-images imgedit ImgEdit"),
    ("app.md", "import torch"),
    ("attention.md", 'tuna2 attend photo.jpg "Where is the helmet?"'),
    ("demo.md", "python examples/shapes/make_data.py"),
    ("training.md", "python examples/sft.py --model ./tuna2-7b"),
    ("training.md", "import torch"),
    ("training.md", 'tuna2 generate "a red fox" -o fox.png --model ./tuna2-7b --lora'),
    ("training.md", "# 1. Convert, and list the layers that look freshly initialised."),
    ("tuna-r.md", "tuna2 convert --checkpoint tuna_2r_pixel_7b.pt"),
    ("tuna-r.md", "tuna2 init --qwen /models/Qwen2.5-7B-Instruct --siglip"),
    ("tuna-r.md", "import torch\nfrom transformers import AutoModelForImageTextToText"),
}
# Snippets that run only where the `quant` extra (torchao, bitsandbytes) is installed, as .ci/run's second pass has it.
NEEDS_QUANT = re.compile(r"needs the `quant` extra", re.I)
# Installing is what the test environment already did: these lines of a bash snippet are listed, not run.
INSTALLS = ("pip install ", "sudo apt-get install ")
FENCE = re.compile(r"^```(\w*)$")


@dataclass
class Snippet:
    document: str
    line: int  # of the opening fence
    language: str
    code: str
    above: str  # the paragraph right above the fence, joined into one line

    @property
    def marked(self) -> bool:
        return bool(NOT_RUN.search(self.above))


def snippets(document: Path) -> list[Snippet]:
    """The bash and python blocks of a markdown document, in order."""
    found, paragraph, block, after_blank = [], [], None, False
    for number, line in enumerate(document.read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if block is None and fence:
            block = Snippet(document.name, number, fence.group(1), "", " ".join(paragraph))
        elif block is not None and line == "```":
            if block.language in ("bash", "python"):
                found.append(block)
            block, paragraph = None, []
        elif block is not None:
            block.code += line + "\n"
        elif line.strip():  # a line of text: the paragraph goes on, or a new one starts after a blank line
            paragraph = [line.strip()] if after_blank else [*paragraph, line.strip()]
            after_blank = False
        else:
            after_blank = True
    return found


def bash_commands(code: str) -> list[list[str]]:
    """The commands of a bash snippet as argument lists: continuation lines joined, comments dropped, `;` and `&&`
    separating commands."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&")
        lexer.whitespace_split = True
        command = []
        for token in lexer:
            if token in (";", "&&"):
                commands.append(command)
                command = []
            else:
                command.append(token)
        commands.append(command)
    return [command for command in commands if command]


def run_command(command: list[str]):
    """One command of a bash snippet, in this process (the imports are paid once): `tuna2 ...` or
    `python <script> ...`."""
    if command[0] == "tuna2":
        try:
            code = cli.main(command[1:])
        except SystemExit as exit:  # --help
            code = exit.code
    elif command[0] == "python" and command[1].endswith(".py"):
        argv = sys.argv
        sys.argv = command[1:]
        try:
            runpy.run_path(command[1], run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code
        finally:
            sys.argv = argv
    else:
        raise AssertionError(f"the test does not know how to run {shlex.join(command)!r}")
    assert code in (0, None), f"{shlex.join(command)} exited with {code}"


def run_snippets(document: Path, tmp_path, monkeypatch) -> list[str]:
    """Runs the document's snippets that are not marked, in order, in one folder and one Python namespace; returns
    what it left out: install lines, and the snippets that need the `quant` extra when it is not installed."""
    from diffusers_tuna2 import demo_model_path

    for folder in ("examples", "conversion", "benchmarks", "docs"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    monkeypatch.chdir(tmp_path)
    scenes = ROOT / "src" / "diffusers_tuna2" / "app_examples"
    # What the text says `path` and `img` are: a checkpoint folder and a PIL image.
    namespace = {
        "path": demo_model_path(),
        "img": PIL.Image.open(scenes / "red-circle-right.png").convert("RGB"),
        "img2": PIL.Image.open(scenes / "blue-square-center.png").convert("RGB"),
        "image": PIL.Image.open(scenes / "green-triangle-left.png").convert("RGB"),
    }
    quant_installed = all(importlib.util.find_spec(name) for name in ("torchao", "bitsandbytes"))
    left_out = []
    for snippet in snippets(document):
        if snippet.marked:
            continue
        if NEEDS_QUANT.search(snippet.above) and not quant_installed:
            left_out.append(f"{snippet.document}:{snippet.line} (the `quant` extra is not installed)")
            continue
        if snippet.language == "python":
            with torch.no_grad():
                exec(compile(snippet.code, f"{snippet.document}:{snippet.line}", "exec"), namespace)
            continue
        for command in bash_commands(snippet.code):
            if shlex.join(command).startswith(INSTALLS):
                left_out.append(shlex.join(command))
            else:
                run_command(command)
    return left_out


def test_the_snippets_left_out_say_why_and_are_listed():
    marked = [snippet for document in DOCUMENTS for snippet in snippets(document) if snippet.marked]
    print("not run:", *(f"{s.document}:{s.line} ({s.above})" for s in marked), sep="\n  ")
    listed = [
        next(
            ((document, start) for document, start in MARKED if s.document == document and s.code.startswith(start)), s
        )
        for s in marked
    ]
    assert sorted(listed, key=str) == sorted(MARKED, key=str)


@pytest.mark.parametrize(
    "document",
    [document for document in DOCUMENTS if any(not snippet.marked for snippet in snippets(document))],
    ids=lambda document: document.name,
)
def test_every_snippet_runs_on_the_demo(document, tmp_path, monkeypatch):
    left_out = run_snippets(document, tmp_path, monkeypatch)
    print("not run:", *left_out, sep="\n  ")


# The demo's recipe (docs/demo.md), marked as long, shortened: a few samples and steps, and shipped into a folder of
# its own, not over the package's demo.
SHORTENED = {
    "examples/shapes/make_data.py": ([], ["--num-t2i", "8", "--num-mmu", "8", "--num-edit", "8"]),
    "examples/sft.py": (
        [("--max-steps", "2"), ("--batch-size", "2"), ("--save-steps", "2"), ("--warmup-steps", "1")],
        [],
    ),
    "examples/shapes/ship.py": ([], ["--output", "shipped"]),
    "examples/shapes/evaluate.py": ([], ["--model", "shipped", "--limit", "1", "--steps", "2"]),
}


def shortened(command: list[str]) -> list[str]:
    replaced, added = SHORTENED.get(command[1], ([], []))
    command = list(command)
    for option, value in replaced:
        command[command.index(option) + 1] = value
    return command + added


def test_the_demo_recipe_runs_shortened(tmp_path, monkeypatch):
    (recipe,) = [snippet for snippet in snippets(ROOT / "docs" / "demo.md") if "examples/sft.py" in snippet.code]
    assert recipe.marked
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    commands = bash_commands(recipe.code)
    assert {command[1] for command in commands} == set(SHORTENED) | {"examples/shapes/init_model.py"}
    for command in commands:
        run_command(shortened(command))
    shipped = tmp_path / "shipped"
    # The shipped folder is laid out as the package's demo: its pipeline module names the package's pipeline.
    assert json.loads((shipped / "model_index.json").read_text())["_class_name"] == ["pipeline_tuna2", "Tuna2Pipeline"]
    demo_module = Path(diffusers_tuna2.demo_model_path()) / "pipeline_tuna2.py"
    assert (shipped / "pipeline_tuna2.py").read_text() == demo_module.read_text()
