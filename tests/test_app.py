"""`tuna2 app`: the web app on a shapes model, served on a free local port and driven through Gradio's Python client
and a headless Chromium. Its images are judged by the shapes analyser; bad input is a one-line error after which the
app keeps serving; concurrent requests each get their own seed's image; `tuna2 app` fails in one line without Gradio
or without a usable model.
"""

import io
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from playwright.sync_api import sync_playwright

import diffusers_tuna2
from diffusers_tuna2 import Tuna2Pipeline, defaults
from diffusers_tuna2.app import EXAMPLES, build_app, launch
from diffusers_tuna2.cli import main

ROOT = Path(__file__).parents[1]
MODEL = diffusers_tuna2.demo_model_path()
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; .ci/run installs it


@pytest.fixture(scope="module")
def pipe():
    pipe = Tuna2Pipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def url(pipe):
    app = build_app(pipe)
    launch(app, port=free_port(), prevent_thread_lock=True)
    yield app.local_url
    app.close()


@pytest.fixture(scope="module")
def client(url):
    return Client(url, verbose=False)


def scene(shapes, image) -> list[tuple[str, str, str]]:
    return [shape.triple for shape in shapes.analyse(PIL.Image.open(image) if isinstance(image, str) else image)]


def saved_render(shapes, tmp_path, colour, shape, position) -> str:
    path = tmp_path / f"{colour}-{shape}-{position}.png"
    shapes.render([shapes.Shape(colour, shape, position)]).save(path)
    return str(path)


def answer(chat: list[dict]) -> str:
    return "".join(part["text"] for part in chat[-1]["content"])


# ---------------------------------------------------------------------------------------------------- the three tabs


def test_generate_draws_each_seed_and_reports_the_denoising_steps(client, shapes):
    job = client.submit(prompt="a blue square in the center", seed=4, image_count=2, api_name="/generate")
    progress = []
    while not job.done():
        progress += job.status().progress_data or []
        time.sleep(0.01)
    gallery = job.result()
    assert [item["caption"] for item in gallery] == ["seed 4", "seed 5"]
    assert [scene(shapes, item["image"]) for item in gallery] == [[("blue", "square", "center")]] * 2
    steps = defaults.NUM_INFERENCE_STEPS
    assert progress and all(p.unit == "steps" and p.length == steps and p.desc == "Denoising" for p in progress)
    assert all(1 <= p.index <= steps for p in progress)


def test_ask_answers_a_chat_about_a_demo_scene(client, shapes, tmp_path):
    image = handle_file(saved_render(shapes, tmp_path, "blue", "square", "center"))
    chat, question = client.predict(image, "What colour is the shape?", api_name="/ask")
    assert answer(chat) == "blue" and question == ""
    chat, _ = client.predict(image, "Where is the shape?", chat, api_name="/ask")
    assert answer(chat) == "center" and [message["role"] for message in chat] == ["user", "assistant"] * 2


def scripted_answer(tokenizer, text: str, failure: Exception | None = None):
    """A `generate()` that streams `text` token by token, then raises `failure` if given (the demo answers in one
    word, which shows no streaming)."""

    def generate(input_ids, streamer, **kwargs):
        streamer.put(input_ids)  # the prompt, which the streamer skips
        for token in tokenizer(text)["input_ids"]:
            streamer.put(torch.tensor([token]))
        if failure is not None:
            raise failure
        streamer.end()

    return generate


def test_answers_stream_as_they_are_decoded(client, pipe, shapes, tmp_path, monkeypatch):
    """The answer grows as transformers' streamer decodes it: by whole words before transformers 5.24, as soon as a
    token is decoded since."""
    sentence = "It is a blue square in the center."
    monkeypatch.setattr(pipe.model, "generate", scripted_answer(pipe.processor.tokenizer, sentence))
    image = handle_file(saved_render(shapes, tmp_path, "blue", "square", "center"))
    job = client.submit(image, "Describe the image.", api_name="/ask")
    job.result()
    shown = [answer(chat).strip() for chat, _ in job.outputs()]
    assert shown[-1] == sentence and len(set(shown)) >= len(sentence.split())
    assert all(sentence.startswith(text) and len(text) <= len(later) for text, later in zip(shown, shown[1:]))


def test_a_failing_model_is_one_line_and_the_app_keeps_serving(client, pipe, shapes, tmp_path, monkeypatch):
    image = handle_file(saved_render(shapes, tmp_path, "blue", "square", "center"))
    failure = RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")

    def fail(*args, **kwargs):
        raise failure

    with monkeypatch.context() as patches:
        patches.setattr(pipe.model, "generate", scripted_answer(pipe.processor.tokenizer, "It is", failure))
        with pytest.raises(AppError, match=r"^answering failed: CUDA out of memory\.$"):
            client.predict(image, "Describe the image.", api_name="/ask")
        patches.setattr(pipe.model, "forward", fail)
        with pytest.raises(AppError, match=r"^drawing failed: CUDA out of memory\.$"):
            client.predict(prompt="a red circle on the right", api_name="/generate")
    chat, _ = client.predict(image, "What colour is the shape?", api_name="/ask")
    assert answer(chat) == "blue"
    assert scene(shapes, client.predict(prompt="a red circle on the right", api_name="/generate")[0]["image"]) == [
        ("red", "circle", "right")
    ]


def test_edit_changes_the_source_as_told(client, shapes, tmp_path):
    source = handle_file(saved_render(shapes, tmp_path, "green", "triangle", "left"))
    edited = client.predict(source, "make the triangle yellow", api_name="/edit")
    assert scene(shapes, edited) == [("yellow", "triangle", "left")]


def test_examples_are_demo_scenes(shapes):
    """The Ask and Edit examples are the demo's renders of the scenes they are named after."""
    for path in sorted(EXAMPLES.glob("*.png")):
        rendered = shapes.render([shapes.Shape(*path.stem.split("-"))])
        assert np.array_equal(np.asarray(PIL.Image.open(path).convert("RGB")), np.asarray(rendered)), path.name


# ---------------------------------------------------------------------------------------------------- robustness


def test_bad_input_is_a_one_line_error_and_the_app_keeps_serving(client, shapes, tmp_path):
    unreadable = tmp_path / "notes.png"
    unreadable.write_text("not an image")
    rendered = handle_file(saved_render(shapes, tmp_path, "red", "circle", "right"))
    requests = [
        ({"prompt": "   ", "api_name": "/generate"}, "Write a prompt"),
        ({"prompt": "a red circle", "height": 50, "api_name": "/generate"}, "multiples of the patch size 16"),
        ({"image_path": None, "question": "What shape is it?", "api_name": "/ask"}, "Upload an image"),
        (
            {"image_path": handle_file(str(unreadable)), "question": "What?", "api_name": "/ask"},
            "cannot read image notes.png",
        ),
        ({"image_path": rendered, "question": " ", "api_name": "/ask"}, "Write a question"),
        ({"image_path": rendered, "instruction": "", "api_name": "/edit"}, "Write an instruction"),
        ({"image_path": None, "instruction": "make it red", "api_name": "/edit"}, "Upload an image to edit"),
    ]
    for request, message in requests:
        with pytest.raises(AppError) as error:
            client.predict(**request)
        assert message in str(error.value) and "\n" not in str(error.value)
    assert scene(shapes, client.predict(prompt="a red circle on the right", api_name="/generate")[0]["image"]) == [
        ("red", "circle", "right")
    ]


def test_ten_concurrent_requests_each_get_their_own_seed(client, pipe):
    prompt, steps, seeds = "a green triangle on the left", 10, range(10)
    jobs = [client.submit(prompt=prompt, steps=steps, seed=seed, api_name="/generate") for seed in seeds]
    served = [np.asarray(PIL.Image.open(job.result(timeout=120)[0]["image"])) for job in jobs]
    direct = [
        np.asarray(pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).images[0])
        for seed in seeds
    ]
    # Every seed draws a different image, so matching the direct call of its own seed cannot happen by a mix-up.
    assert all(not np.array_equal(direct[i], direct[j]) for i in seeds for j in seeds if i < j)
    assert all(np.array_equal(image, reference) for image, reference in zip(served, direct))


# ---------------------------------------------------------------------------------------------------- in a browser


def test_a_browser_generates_an_image(url, shapes, tmp_path):
    assert CHROMIUM.is_file(), f"no {CHROMIUM}: install Debian's Chromium (apt-get install chromium), as .ci/run does"
    # TUNA2_APP_SCREENSHOT=docs/app.png writes the screenshot of docs/app.md.
    screenshot = Path(os.environ.get("TUNA2_APP_SCREENSHOT", tmp_path / "app.png"))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(url)
        page.get_by_role("tab", name="Generate").click()
        page.get_by_label("Prompt", exact=True).fill("a purple square on the bottom")
        page.get_by_role("button", name="Generate", exact=True).click()
        shown = page.locator("#generated img").first
        shown.wait_for(timeout=60_000)
        image = PIL.Image.open(io.BytesIO(page.request.get(shown.get_attribute("src")).body()))
        page.screenshot(path=screenshot)
        browser.close()
    assert scene(shapes, image) == [("purple", "square", "bottom")]


# ---------------------------------------------------------------------------------------------------- `tuna2 app`


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuna2: error: ") and "\n" not in err, err
    return err.removeprefix("tuna2: error: ")


def test_without_gradio_the_command_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` finds when it is not installed
    monkeypatch.delitem(sys.modules, "diffusers_tuna2.app")
    monkeypatch.delattr(diffusers_tuna2, "app")
    assert main(["app", "--model", MODEL]) == 1
    assert one_line_error(capsys) == 'the app needs Gradio: pip install "tuna2-hf[app]"'


def test_a_missing_or_damaged_model_is_one_line_before_serving(tmp_path, capsys):
    assert main(["app", "--model", str(tmp_path / "missing")]) == 1
    assert one_line_error(capsys) == f"no such folder: {tmp_path / 'missing'}"
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "tokenizer.json"):  # no weights
        (damaged / name).write_text((Path(MODEL) / name).read_text())
    assert main(["app", "--model", str(damaged)]) == 1
    assert one_line_error(capsys).startswith(f"cannot load the checkpoint in {damaged}: ")


def test_a_taken_port_is_one_line(url, capsys):
    port = urllib.parse.urlsplit(url).port  # the test server's
    assert main(["app", "--model", MODEL, "--port", str(port)]) == 1
    assert one_line_error(capsys) == f"cannot serve on port {port}: it is in use or not allowed; pass another --port"


def test_help_does_not_import_gradio():
    code = "import sys\nfrom diffusers_tuna2.cli import main\ntry:\n    main(['app', '--help'])\nexcept SystemExit:\n"
    code += "    print('gradio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--port" in result.stdout and result.stdout.splitlines()[-1] == "False"
