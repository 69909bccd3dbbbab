"""Tuna-2 in lmms-eval: the installed `lmms-eval` command finds `--model tuna2` through this package's entry point and
scores a task defined here, on a dataset built on disk, as `examples/shapes/evaluate.py` scores the same questions."""

import json
import os
import re
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import PIL.Image
import pytest

from diffusers_tuna2 import demo_model_path
from tuna2_eval import LMMS_EVAL_MODEL

TASK = "tuna2_shapes_demo"
SPLIT = "held_out"


def write_task(folder, shapes_evaluation, cases):
    """A local lmms-eval task: the dataset saved with `datasets` (no hub), a task YAML and its functions, judged with
    `examples/shapes/evaluate.py`'s own rule."""
    from datasets import Dataset, DatasetDict, Features, Image, Value

    features = Features(
        {"image": Image(), "kind": Value("string"), "question": Value("string"), "answer": Value("string")}
    )
    rows = {key: [] for key in features}
    for image, kind, question, answer in cases:
        for key, value in zip(features, (image, kind, question, answer)):
            rows[key].append(value)
    DatasetDict({"test": Dataset.from_dict(rows, features=features)}).save_to_disk(folder / "dataset")
    (folder / "shapes_task.py").write_text(
        textwrap.dedent(
            f"""
            import importlib.util

            # examples/shapes/evaluate.py, by path: the name `evaluate` is also Hugging Face's package
            spec = importlib.util.spec_from_file_location("shapes_evaluation", {shapes_evaluation.__file__!r})
            shapes_evaluation = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(shapes_evaluation)


            def doc_to_visual(doc):
                return [doc["image"].convert("RGB")]


            def doc_to_text(doc):
                return doc["question"]


            def process_results(doc, results):
                return {{"accuracy": float(shapes_evaluation.judge_answer(results[0], doc["answer"]))}}
            """
        )
    )
    (folder / f"{TASK}.yaml").write_text(
        textwrap.dedent(
            f"""
            task: {TASK}
            dataset_path: {folder / "dataset"}
            dataset_kwargs:
              load_from_disk: true
            test_split: test
            output_type: generate_until
            doc_to_visual: !function shapes_task.doc_to_visual
            doc_to_text: !function shapes_task.doc_to_text
            doc_to_target: answer
            generation_kwargs:
              max_new_tokens: 8
              temperature: 0
            process_results: !function shapes_task.process_results
            metric_list:
              - metric: accuracy
                aggregation: mean
                higher_is_better: true
            """
        )
    )


def test_the_package_registers_tuna2_with_lmms_eval():
    (entry_point,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == LMMS_EVAL_MODEL]
    manifest = entry_point.load()()
    assert manifest.model_id == LMMS_EVAL_MODEL
    assert manifest.simple_class_path == "tuna2_eval.lmms_eval_tuna2.Tuna2"


def test_lmms_eval_scores_the_demo_task_as_the_demo_evaluation(shapes_evaluation, tmp_path):
    """The held-out questions through `lmms-eval --model tuna2` (batched, left-padded) get the accuracy, and the
    answers, of `evaluate.py`'s `ask` (one question at a time)."""
    cases = shapes_evaluation.question_cases(SPLIT)
    write_task(tmp_path, shapes_evaluation, cases)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    command = [
        sys.executable, "-m", "lmms_eval", "eval",
        "--model", LMMS_EVAL_MODEL,
        "--model_args", f"pretrained={demo_model_path()},device=cpu,dtype=float32",
        "--tasks", TASK,
        "--include_path", str(tmp_path),
        "--batch_size", "8",
        "--output_path", str(tmp_path / "results"),
        "--log_samples",
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    # lmms-eval logs an error in evaluation and exits with 0: the results file tells that it ran.
    results_files = list((tmp_path / "results").rglob("*_results.json"))
    assert run.returncode == 0 and len(results_files) == 1, run.stdout[-3000:] + run.stderr[-3000:]
    (results_file,) = results_files
    lmms_eval_accuracy = json.loads(results_file.read_text())["results"][TASK]["accuracy,none"]
    (samples_file,) = (tmp_path / "results").rglob(f"*_samples_{TASK}.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    lmms_eval_answers = [sample["filtered_resps"] for sample in samples]

    _, _, ask = shapes_evaluation.library_interfaces(demo_model_path())
    answers = [ask(image, question) for image, _, question, _ in cases]
    accuracy = shapes_evaluation.fraction([shapes_evaluation.judge_answer(a, c[3]) for a, c in zip(answers, cases)])
    assert [answer.strip() for answer in answers] == lmms_eval_answers
    assert lmms_eval_accuracy == pytest.approx(accuracy)
    assert accuracy >= shapes_evaluation.FLOOR["answers"]


@pytest.fixture(scope="module")
def lmms_eval_model():
    from tuna2_eval.lmms_eval_tuna2 import Tuna2

    return Tuna2(pretrained=demo_model_path(), device="cpu")


def test_the_prompt_is_the_official_evaluation_prompt(lmms_eval_model):
    """The task's `<image>` tags removed, the first image before the question, under Qwen's default system turn."""
    image, other = PIL.Image.new("RGB", (48, 48), "red"), PIL.Image.new("RGB", (48, 48), "blue")
    conversation = lmms_eval_model.conversation("<image>\nWhat colour is the shape? <image> ", [image, other])
    text = lmms_eval_model.processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nWhat colour is the shape?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_generation_settings_follow_the_task(lmms_eval_model):
    assert lmms_eval_model.generation_options({"until": ["\n\n"]}) == {
        "max_new_tokens": 512,
        "num_beams": 1,
        "do_sample": False,
    }
    sampled = lmms_eval_model.generation_options({"max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9})
    assert sampled == {"max_new_tokens": 16, "num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9}


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ({"dtype": "float64"}, "dtype must be auto or one of float32, bfloat16, float16, got 'float64'"),
        ({"batch_size": 0}, "batch_size and max_new_tokens must be whole numbers >= 1"),
        ({"use_flash_attention_2": True}, "tuna2 does not take the model_args use_flash_attention_2"),
    ],
)
def test_bad_model_args_fail_in_one_line(model_args, message):
    from tuna2_eval.lmms_eval_tuna2 import Tuna2

    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Tuna2(pretrained=demo_model_path(), device="cpu", **model_args)
