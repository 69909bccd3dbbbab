"""`tuna2 bench-images`: each benchmark's prompt file in, its evaluator's folder layout out, resumable, and the GenEval
layout of the demo's held-out prompts scoring what the demo's evaluation scores."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_tuna2 import Tuna2Pipeline, bench_images, demo_model_path
from diffusers_tuna2.cli import main as tuna2

FEW_STEPS = ["--steps", "2"]  # the layout and resume tests check files, not the drawings
# The demo draws every held-out prompt right from 10 steps on (50 by default), in a fifth of the time.
SCORED_STEPS = 10


@pytest.fixture(scope="module")
def pipe():
    pipe = Tuna2Pipeline.from_pretrained(demo_model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def seeded(seeds):
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def write_geneval_metadata(path, prompts):
    lines = [json.dumps({"tag": "shapes", "include": [], "prompt": prompt}) for prompt in prompts]
    path.write_text("\n".join(lines) + "\n")
    return lines


def test_geneval_output_of_demo_prompts_scores_at_the_demo_generation_accuracy(shapes_evaluation, shapes, tmp_path):
    """The held-out captions as a GenEval metadata file: one folder per prompt with its metadata line and its samples,
    which the demo's analyser scores as it scores the same prompts and seeds drawn one at a time by `evaluate.py`."""
    cases = {prompt: shape for prompt, shape, _ in shapes_evaluation.generation_cases("held_out")}
    lines = write_geneval_metadata(tmp_path / "evaluation_metadata.jsonl", list(cases))
    out = tmp_path / "geneval"
    argv = ["bench-images", "geneval", str(tmp_path / "evaluation_metadata.jsonl"), "-o", str(out), "--samples", "2"]
    assert tuna2([*argv, "--batch-size", "24", "--steps", str(SCORED_STEPS)]) == 0

    folders = sorted(path.name for path in out.iterdir() if path.is_dir())
    assert folders == [f"{index:05d}" for index in range(len(cases))]
    records = [json.loads(line) for line in (out / bench_images.SEEDS_LOG).read_text().splitlines()]
    assert [record["name"] for record in records] == folders
    judged, expected = [], []
    generate, _, _ = shapes_evaluation.library_interfaces(demo_model_path(), steps=SCORED_STEPS)
    for folder, line, record in zip(folders, lines, records):
        assert (out / folder / "metadata.jsonl").read_text() == line + "\n"
        assert sorted(p.name for p in (out / folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        shape = cases[json.loads(line)["prompt"]]
        for n, seed in enumerate(record["seeds"]):
            judged.append(
                shapes_evaluation.judge_image(PIL.Image.open(out / folder / "samples" / f"{n:04d}.png"), shape)
            )
            expected.append(shapes_evaluation.judge_image(generate(record["prompt"], seed), shape))
    assert len({seed for record in records for seed in record["seeds"]}) == 2 * len(cases)
    accuracy = shapes_evaluation.fraction(judged)
    assert accuracy == shapes_evaluation.fraction(expected)
    assert accuracy >= shapes_evaluation.FLOOR["generation"]


def test_dpg_writes_a_two_by_two_grid_per_prompt_file(pipe, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "shapes_a.txt").write_text("a red circle on the left\n")
    (prompts / "shapes_b.txt").write_text("a blue square on the top\n")
    out = tmp_path / "dpg"
    assert tuna2(["bench-images", "dpg", str(prompts), "-o", str(out), *FEW_STEPS, "--seed", "7"]) == 0

    assert sorted(path.name for path in out.iterdir()) == ["seeds.jsonl", "shapes_a.png", "shapes_b.png"]
    grid = PIL.Image.open(out / "shapes_b.png")
    assert grid.size == (96, 96)  # 2x2 samples of the demo's 48x48
    # shapes_b is the second file: its samples are seeded 7 + 4..7, and sit row by row in the grid
    samples = pipe(
        "a blue square on the top", num_images_per_prompt=4, num_inference_steps=2, generator=seeded(range(11, 15))
    ).images
    for n, sample in enumerate(samples):
        left, top = 48 * (n % 2), 48 * (n // 2)
        np.testing.assert_array_equal(pixels(grid.crop((left, top, left + 48, top + 48))), pixels(sample))


def test_imgedit_writes_one_edited_image_per_instruction_key(pipe, shapes_evaluation, tmp_path):
    (source, instruction, _), (source_2, instruction_2, _) = shapes_evaluation.edit_cases("held_out")[:2]
    (tmp_path / "images" / "shapes").mkdir(parents=True)
    source.save(tmp_path / "images" / "shapes" / "a.png")
    source_2.save(tmp_path / "images" / "shapes" / "b.png")
    edits = {
        "1082": {"id": "shapes/a.png", "prompt": instruction, "edit_type": "alter"},
        "673": {"id": "shapes/b.png", "prompt": instruction_2, "edit_type": "replace"},
    }
    (tmp_path / "basic_edit.json").write_text(json.dumps(edits))
    out = tmp_path / "imgedit"
    argv = ["bench-images", "imgedit", str(tmp_path / "basic_edit.json"), "--images", str(tmp_path / "images")]
    assert tuna2([*argv, "-o", str(out), *FEW_STEPS]) == 0

    assert sorted(path.name for path in out.iterdir()) == ["1082.png", "673.png", "seeds.jsonl"]
    edited = pipe(instruction_2, image=source_2, num_inference_steps=2, generator=seeded([1])).images[0]
    np.testing.assert_array_equal(pixels(PIL.Image.open(out / "673.png")), pixels(edited))


def test_an_interrupted_run_resumes_without_redoing_finished_prompts(monkeypatch, tmp_path):
    """Killed while writing the second prompt's second sample, a run leaves the first prompt whole and the half-written
    sample under a temporary name only; the next run draws only the prompts left, with the seeds they would have had,
    and the folder ends as an uninterrupted run's."""
    prompts = ["a red circle on the left", "a blue square on the top", "a green triangle in the center"]
    metadata = tmp_path / "evaluation_metadata.jsonl"
    write_geneval_metadata(metadata, prompts)
    argv = ["bench-images", "geneval", str(metadata), "--samples", "2", "--batch-size", "2", *FEW_STEPS]

    assert tuna2([*argv, "-o", str(tmp_path / "whole")]) == 0

    save_whole = bench_images.save_whole
    saved = []

    def interrupted_while_writing_the_second_prompt(write, path):
        if len(saved) == 5:  # prompt 0's samples, metadata and seeds log, prompt 1's first sample, then its second
            write(path.with_name(f".{path.stem}.partial{path.suffix}"))
            raise KeyboardInterrupt
        saved.append(path)
        save_whole(write, path)

    monkeypatch.setattr(bench_images, "save_whole", interrupted_while_writing_the_second_prompt)
    out = tmp_path / "resumed"
    assert tuna2([*argv, "-o", str(out)]) == 130
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "00000/metadata.jsonl",
        "00000/samples/0000.png",
        "00000/samples/0001.png",
        "00001/samples/.0001.partial.png",  # what an interruption in the middle of a write leaves
        "00001/samples/0000.png",
        "seeds.jsonl",
    ]
    monkeypatch.setattr(bench_images, "save_whole", save_whole)

    drawn = []
    call = Tuna2Pipeline.__call__

    def recording_call(self, prompt, **kwargs):
        drawn.extend(prompt)
        return call(self, prompt, **kwargs)

    monkeypatch.setattr(Tuna2Pipeline, "__call__", recording_call)
    assert tuna2([*argv, "-o", str(out)]) == 0
    assert drawn == prompts[1:]
    whole = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*") if p.is_file())
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == whole
    for path in whole:
        if path.suffix == ".png":
            np.testing.assert_array_equal(
                pixels(PIL.Image.open(out / path)), pixels(PIL.Image.open(tmp_path / "whole" / path))
            )
        else:
            assert (out / path).read_text() == (tmp_path / "whole" / path).read_text()

    drawn.clear()
    assert tuna2([*argv, "-o", str(out)]) == 0
    assert drawn == []


@pytest.mark.parametrize(
    ("benchmark", "content", "message"),
    [
        ("geneval", '{"tag": "single_object"}\n', 'line 1: a GenEval metadata line needs a "prompt" string'),
        ("geneval", "not json\n", "line 1: not JSON"),
        ("imgedit", '{"1": {"prompt": "make it red"}}', "instruction '1' needs \"id\""),
    ],
)
def test_a_malformed_prompt_file_fails_in_one_line(benchmark, content, message, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(content)
    assert tuna2(["bench-images", benchmark, str(prompts), "-o", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()
