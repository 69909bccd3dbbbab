"""The `tuna2` command on a tiny checkpoint: what it writes, and one-line errors for bad input."""

import subprocess
import sys

import PIL.Image
import pytest

from diffusers_tuna2.cli import main


def test_generate_edit_ask(checkpoint, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "-o", str(out), "--model", checkpoint, "--steps", "2"]) == 0
    assert PIL.Image.open(out).size == (32, 32)  # the processor's size
    edited = tmp_path / "edited.png"
    assert (
        main(
            [
                "edit",
                str(out),
                "make it blue",
                "-o",
                str(edited),
                "--model",
                checkpoint,
                "--steps",
                "2",
                "--size",
                "48x32",
            ]
        )
        == 0
    )
    assert PIL.Image.open(edited).size == (32, 48)
    capsys.readouterr()
    assert main(["ask", str(out), "What colour?", "--model", checkpoint, "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_same_seed_same_image(checkpoint, tmp_path):
    for name in ("a.png", "b.png"):
        assert (
            main(["generate", "x", "-o", str(tmp_path / name), "--model", checkpoint, "--steps", "2", "--seed", "3"])
            == 0
        )
    assert PIL.Image.open(tmp_path / "a.png").tobytes() == PIL.Image.open(tmp_path / "b.png").tobytes()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ask", "missing.png", "What?"], "image not found: missing.png"),
        (["edit", "NOTIMAGE", "x", "-o", "o.png"], "cannot read image"),
        (["generate", "x", "-o", "o.png", "--size", "30x32"], "multiples of the patch size"),
        (["generate", "x", "-o", "o.png", "--size", "big"], "--size must look like"),
        (["generate", "x", "-o", "o.png", "--steps", "0"], "--steps must be a whole number >= 1"),
        (["generate", "x", "-o", "o.png", "--model", "no/such/folder"], "no such folder: no/such/folder"),
    ],
)
def test_errors_are_one_line(checkpoint, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "NOTIMAGE").write_text("hello")
    if "--model" not in argv:
        argv = argv + ["--model", checkpoint]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuna2: error:") and message in err and "\n" not in err


def test_console_script_is_installed(checkpoint, tmp_path):
    tuna2 = str(__import__("pathlib").Path(sys.executable).parent / "tuna2")
    result = subprocess.run(
        [tuna2, "ask", str(tmp_path / "none.png"), "?", "--model", checkpoint], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("tuna2: error: image not found") and "Traceback" not in result.stderr
