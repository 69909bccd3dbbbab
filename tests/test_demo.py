"""The shapes demo: the commands docs/demo.md shows, run again as written, make the images it shows and print the
answer it shows, offline; and the one-line error while the package has no demo."""

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

ROOT = Path(__file__).parents[1]
DEMO_DOC = ROOT / "docs" / "demo.md"


def shown_commands() -> list[str]:
    block = re.search(r"```bash\n(tuna2 .*?)```", DEMO_DOC.read_text(), flags=re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_demo_commands_make_the_images_docs_show(tmp_path):
    text = DEMO_DOC.read_text()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    commands = shown_commands()
    assert [shlex.split(command)[1] for command in commands] == ["generate", "ask", "edit"]
    for command in commands:
        argv = [str(ROOT / arg) if arg.startswith("examples/") else arg for arg in shlex.split(command)]
        started = time.perf_counter()
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        if argv[1] == "ask":
            shown = re.search(r"\| `tuna2 ask[^|]*\|[^\n]*\n\|[-| ]+\|\n\|[^|]*\| ([^|]+) \|", text).group(1)
            assert result.stdout.strip() == shown.strip("` ")
            continue
        if argv[1] == "generate":
            assert time.perf_counter() - started < 60  # a minute on a 2-core CPU
        output = argv[argv.index("-o") + 1]
        made = np.asarray(PIL.Image.open(tmp_path / output), dtype=np.int16)
        shown = np.asarray(PIL.Image.open(ROOT / "docs" / "demo" / output), dtype=np.int16)
        # The same computation; another thread count may change float sums in the last bits.
        assert made.shape == shown.shape and np.abs(made - shown).max() <= 3


def test_missing_demo_is_one_clear_error(monkeypatch, tmp_path):
    from diffusers_tuna2 import demo

    monkeypatch.setattr(demo, "DEMO_MODEL", tmp_path / "demo_model")
    with pytest.raises(FileNotFoundError, match="shapes demo model is missing"):
        demo.demo_model_path()
