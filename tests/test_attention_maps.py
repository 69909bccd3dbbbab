"""Attention maps (`transformers_tuna2.attention_maps`, `tuna2 attend`): the shapes demo looks at the shape, the hooked
weights are the model's own, maps have each image's patch grid (several images, non-square buckets), and the command
writes an overlay."""

import re
from pathlib import Path

import PIL.Image
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from diffusers_tuna2 import demo_model_path
from diffusers_tuna2.cli import main
from transformers_tuna2 import Tuna2AttentionMaps, attention_maps, overlay_attention_map
from transformers_tuna2.attention_maps import parse_layers


@pytest.fixture(scope="module")
def demo():
    path = demo_model_path()
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def shape_patch(shapes, image) -> tuple[int, int]:
    """(row, column) of the patch that holds the scene's one shape, as the pixel analyser finds it."""
    (found,) = shapes.analyse(image)
    x, y = shapes.POSITIONS[found.position]
    return y // shapes.PATCH, x // shapes.PATCH


def test_demo_looks_at_the_shape_when_asked_its_colour(demo, shapes, shapes_evaluation):
    """Over the 12 held-out scenes of evaluate.py and all 90 colour x shape x position scenes, the map of "What colour
    is the shape?" (all layers, as the official script) puts more than 1/9 of its mass on the shape's patch in every
    scene; measured (examples/shapes/attention_check.py): 100% of scenes, mass 4.3x the patch's share on the held-out
    scenes, 4.2x on all 90. The floor asserted here is 90% of scenes and 3x."""
    model, processor = demo
    held_out = [image for image, kind, _, _ in shapes_evaluation.question_cases("held_out") if kind == "colour"]
    grid = [
        shapes.render([shapes.Shape(c, s, p)]) for c in shapes.COLOURS for s in shapes.SHAPES for p in shapes.POSITIONS
    ]
    for scenes in (held_out, grid):
        ratios = []
        for image in scenes:
            (attention_map,) = attention_maps(model, processor, image, shapes.QUESTIONS["colour"]).maps
            assert attention_map.shape == (3, 3)
            ratios.append(float(attention_map[shape_patch(shapes, image)] / attention_map.sum()) * 9)
        hits = sum(ratio > 1 for ratio in ratios) / len(ratios)
        assert hits >= 0.9 and sum(ratios) / len(ratios) > 3, (hits, ratios)


def test_hooked_weights_are_the_models_eager_attentions(demo, shapes):
    model, processor = demo
    image = shapes.render([shapes.Shape("blue", "square", "top")])
    before = (model.config._attn_implementation, model.config.text_config._attn_implementation)
    result = attention_maps(model, processor, image, "What colour is the shape?", layers=[1, -1])
    assert (model.config._attn_implementation, model.config.text_config._attn_implementation) == before
    assert result.layers == [1, 3] and "".join(result.query_tokens) == "What colour is the shape?"
    assert not any(module._forward_hooks for module in model.modules())

    # The same from a full eager forward with output_attentions.
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    eager = AutoModelForImageTextToText.from_pretrained(demo_model_path(), attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    ids = inputs.input_ids[0].tolist()
    span = ids.index(processor.image_token_id)
    end = len(ids) - ids[::-1].index(processor.tokenizer.convert_tokens_to_ids("<|im_end|>")) - 1
    rows = list(range(span + 10 + 2, end))  # after the span, <|vision_end|> and the "\n" before the question
    expected = torch.stack([attentions[i][0][:, rows, span + 1 : span + 10].mean((0, 1)) for i in (1, 3)]).mean(0)
    assert len(rows) == len(result.query_tokens)
    torch.testing.assert_close(result.maps[0].flatten(), expected)


def test_answer_and_target_queries(demo, shapes):
    model, processor = demo
    image = shapes.render([shapes.Shape("green", "triangle", "right")])
    given = attention_maps(model, processor, image, "What colour is the shape?", answer="green", query="answer")
    assert given.answer == "green" and "".join(given.query_tokens).strip() == "green"
    generated = attention_maps(model, processor, image, "What colour is the shape?", answer=True, query="both")
    assert generated.answer == "green"
    assert "".join(generated.query_tokens) == "What colour is the shape?" + "green"
    word = attention_maps(model, processor, image, "What colour is the shape?", target="COLOUR")
    assert "".join(word.query_tokens).strip().lower() == "colour"
    with pytest.raises(ValueError, match="no tokens of the word 'zebra'"):
        attention_maps(model, processor, image, "What colour is the shape?", target="zebra")
    with pytest.raises(ValueError, match="reads the answer"):
        attention_maps(model, processor, image, "What colour is the shape?", query="answer")
    with pytest.raises(ValueError, match="layer 4 does not exist"):
        attention_maps(model, processor, image, "What colour is the shape?", layers=4)


def test_two_images_and_non_square_buckets(model, processor):
    """The tiny random model with a 32x48 processor: two images in one prompt get (2, 3) maps each, and a size given to
    the call (48x32) gives (3, 2)."""
    images = [PIL.Image.new("RGB", (48, 32), "red"), PIL.Image.new("RGB", (60, 40), "teal")]
    result = attention_maps(model, processor, images, "Which one is red?")
    assert isinstance(result, Tuna2AttentionMaps)
    assert [tuple(m.shape) for m in result.maps] == [(2, 3), (2, 3)]
    assert [image.size for image in result.images] == [(48, 32), (48, 32)]
    total = sum(float(m.sum()) for m in result.maps)
    assert all(float(m.min()) >= 0 for m in result.maps) and 0 < total <= 1 + 1e-5
    tall = attention_maps(model, processor, images[0], "What?", size={"height": 48, "width": 32})
    assert tuple(tall.maps[0].shape) == (3, 2) and tall.images[0].size == (32, 48)
    overlays = result.overlays(scale=2)
    assert [overlay.size for overlay in overlays] == [(96, 64), (96, 64)]


def test_overlay_helper():
    image = PIL.Image.new("RGB", (48, 32), (128, 128, 128))
    attention_map = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    overlay = overlay_attention_map(image, attention_map, smooth=False)
    assert overlay.size == (48, 32) and overlay.mode == "RGB"
    hot, cold = overlay.getpixel((40, 5)), overlay.getpixel((5, 25))
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red where the map peaks, blue at its minimum
    assert overlay_attention_map(image, torch.zeros(2, 3), scale=3).size == (144, 96)
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        overlay_attention_map(image, torch.zeros(6))


def test_parse_layers():
    assert parse_layers("3") == [3] and parse_layers("0,2") == [0, 2] and parse_layers("1-3,-1") == [1, 2, 3, -1]
    for bad in ("x", "3-1", ""):
        with pytest.raises(ValueError):
            parse_layers(bad)


def test_attend_command_writes_an_overlay(shapes, tmp_path, capsys):
    scene = tmp_path / "scene.png"
    shapes.render([shapes.Shape("red", "circle", "left")]).save(scene)
    out = tmp_path / "map.png"
    assert main(["attend", str(scene), "What colour is the shape?", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    overlay = PIL.Image.open(out)
    assert overlay.format == "PNG" and overlay.size == (288, 288)  # 48x48 enlarged 6x to reach 256 pixels
    red, green, blue = overlay.convert("RGB").getpixel((48, 144))  # the middle of the left patch, the shape's
    assert red > blue
    assert main(["attend", str(scene), "What colour?", "-o", str(out), "--layers", "2-3", "--scale", "1"]) == 0
    assert PIL.Image.open(out).size == (48, 48)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layers", "9"], "--layers: layer 9 does not exist"),
        (["--layers", "two"], "--layers: layers must look like"),
        (["--target", "zebra"], "--target: the question holds no tokens of the word 'zebra'"),
        (["--scale", "0"], "--scale must be a whole factor"),
        (["-o", "map.txt"], "is not an image extension"),
    ],
)
def test_attend_errors_are_one_line(shapes, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    shapes.render([shapes.Shape("red", "circle", "left")]).save("scene.png")
    if "-o" not in argv:
        argv = argv + ["-o", "map.png"]
    assert main(["attend", "scene.png", "What colour is the shape?", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuna2: error:") and message in err and "\n" not in err


def test_readme_example_runs(model, processor, tmp_path, monkeypatch):
    readme = Path(__file__).parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    example = next(block for block in blocks if "attention_maps(" in block)
    monkeypatch.chdir(tmp_path)
    namespace = {"model": model, "processor": processor, "img": PIL.Image.new("RGB", (64, 48), "orange")}
    exec(compile(example, "README.md", "exec"), namespace)
    assert tuple(namespace["result"].maps[0].shape) == (2, 3) and (tmp_path / "map.png").is_file()
