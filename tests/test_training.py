import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from training_data import write_dataset
from trl import SFTConfig

from diffusers_tuna2 import Tuna2Pipeline
from transformers_tuna2 import Tuna2ForConditionalGeneration, Tuna2ImageRole
from tuna2_training.data import Tuna2Collator, Tuna2DataError, Tuna2MixtureDataset, Tuna2Sample, read_jsonl
from tuna2_training.tiny import build_processor, tiny_config, tiny_model
from tuna2_training.trainer import Tuna2SFTTrainer, lora_target_modules

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def train_processor(tokenizer):
    return build_processor(tokenizer, size={"height": 32, "width": 32})


def mixture(data, length, seed=0):
    streams = {task: read_jsonl(path, task) for task, path in data.items()}
    return Tuna2MixtureDataset(streams, {task: 1.0 for task in streams}, length=length, seed=seed)


def trainer_for(model, processor, data, tmp_path, steps, batch_size, learning_rate, peft_config=None, **overrides):
    config = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        adam_beta2=0.95,
        max_grad_norm=10.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        **overrides,
    )
    return Tuna2SFTTrainer(
        model=model,
        args=config,
        train_dataset=mixture(data, steps * batch_size).to_hf_dataset(),
        data_collator=Tuna2Collator(processor, image_size=32),
        processing_class=processor,
        peft_config=peft_config,
    )


def one_batch(data, processor, count=8):
    dataset = mixture(data, count, seed=3)
    return Tuna2Collator(processor, image_size=32)([dataset[i] for i in range(count)])


# ---------------------------------------------------------------------------------------------------- losses


def test_four_samples_per_task_overfit(tokenizer, train_processor, data, tmp_path):
    torch.manual_seed(0)
    model = Tuna2ForConditionalGeneration(tiny_config(tokenizer, output_layout="patch"))  # the official init
    trainer = trainer_for(model, train_processor, data, tmp_path, steps=200, batch_size=16, learning_rate=3e-3)
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "flow_loss" in entry]
    assert len(history) == 200
    for name in ("lm_loss", "flow_loss"):
        first = statistics.mean(entry[name] for entry in history[:20])
        last = statistics.mean(entry[name] for entry in history[180:200])
        assert last < first / 4, f"{name}: {first:.4f} over steps 1-20, {last:.4f} over steps 181-200"


def test_loss_components_and_empty_masks(tokenizer, train_processor, data):
    model = tiny_model(tokenizer).train()  # the model draws the times and noise of a training batch in training mode
    collator = Tuna2Collator(train_processor, image_size=32)
    streams = {task: read_jsonl(path, task) for task, path in data.items()}

    def batch_of(task):
        return collator([{"sample": s, "images": s.load_images()} for s in streams[task][:2]])

    t2i = model(**batch_of("t2i"))  # no labels to learn: lm_loss is 0, not NaN
    assert t2i.lm_loss == 0 and t2i.flow_loss > 0 and torch.isfinite(t2i.loss)
    mmu = model(**batch_of("mmu"))  # no generated image: flow_loss is 0
    assert mmu.flow_loss == 0 and mmu.lm_loss > 0
    text = model(**batch_of("text"))
    assert "pixel_values" not in batch_of("text") and text.flow_loss == 0 and text.lm_loss > 0
    edit = model(**batch_of("edit"))
    torch.testing.assert_close(edit.loss, model.config.lm_loss_weight * edit.lm_loss + edit.flow_loss)


def test_flow_loss_is_the_weighted_x0_error(tokenizer, train_processor, data):
    # Training mode (the model draws t and the noise), without masked patches or noised understanding images.
    model = tiny_model(tokenizer, output_layout="patch", mask_ratio_max=0.0, understanding_noise_prob=0.0).train()
    batch = one_batch(data, train_processor)
    roles = batch["image_roles"]
    torch.manual_seed(5)
    out = model(**batch)  # draws t and the noise
    # the same times and noise, drawn in the same order
    torch.manual_seed(5)
    t = model.training_timesteps(roles)
    clean = list(batch["pixel_values"])
    noise = [torch.randn_like(x) for x in clean]
    noised = [ti * x + (1 - ti) * 2.0 * e for ti, x, e in zip(t.tolist(), clean, noise)]
    with torch.no_grad():
        x0 = model(
            batch["input_ids"],
            torch.stack(noised),
            timesteps=t,
            image_roles=roles,
            attention_mask=batch["attention_mask"],
        ).x0
    torch.testing.assert_close(out.x0, x0)
    targets = roles == Tuna2ImageRole.TARGET
    weights = (1 - t[targets]).clamp(min=model.config.t_eps) ** -2
    squared_errors = ((x0 - torch.stack(clean)[targets]) ** 2).flatten(1).sum(1)
    expected = (weights * squared_errors).sum() / clean[0].numel() / int(targets.sum())
    torch.testing.assert_close(out.flow_loss, expected, rtol=1e-5, atol=1e-6)


def test_collated_layouts(train_processor, data):
    """Every span holds a time slot and all N patches; text-only samples get no span; understanding labels cover the
    assistant answer only; generation samples have no labels."""
    collator = Tuna2Collator(train_processor, image_size=32)
    pad = train_processor.image_token_id
    for task in ("t2i", "edit", "mmu", "text"):
        sample = read_jsonl(data[task], task)[0]
        batch = collator([{"sample": sample, "images": sample.load_images()}])
        spans = (batch["input_ids"] == pad).sum().item()
        assert spans == {"t2i": 5, "edit": 10, "mmu": 5, "text": 0}[task]
        labelled = batch["labels"][batch["labels"] != -100]
        if task in ("t2i", "edit"):
            assert labelled.numel() == 0
        else:
            decoded = train_processor.tokenizer.decode(labelled)
            assert decoded == {"mmu": "A red circle.<|im_end|>", "text": "Red.<|im_end|>"}[task]


def test_caption_positions_do_not_see_the_target_image(tokenizer, train_processor, data):
    """No clean-image leak into the prompt: the prompt's hidden states do not depend on the image being generated."""
    model = tiny_model(tokenizer).eval()
    sample = read_jsonl(data["t2i"], "t2i")[0]
    batch = Tuna2Collator(train_processor, image_size=32)([{"sample": sample, "images": sample.load_images()}])
    first_pad = (batch["input_ids"][0] == train_processor.image_token_id).nonzero()[0].item()
    hidden = []
    for pixels in (batch["pixel_values"], torch.zeros_like(batch["pixel_values"])):
        torch.manual_seed(0)
        states = model.model(input_ids=batch["input_ids"], pixel_values=pixels).last_hidden_state
        hidden.append(states[0, :first_pad])
    assert torch.equal(hidden[0], hidden[1])


# ---------------------------------------------------------------------------------------------------- train mode only


def test_mask_token_only_in_training_mode(tokenizer):
    model = tiny_model(tokenizer, mask_ratio_min=0.5, mask_ratio_max=0.5)
    images = torch.rand(2, 3, 32, 64) * 2 - 1  # 8 patches each: int(8 * 0.5) = 4 masked
    mask_token = model.model.mask_token[0, 0]
    model.train()
    spans = model.model.get_image_features(images).last_hidden_state.unflatten(0, (2, 9))  # time slot + 8 patches
    for span in spans:
        assert (span[1:] == mask_token).all(-1).sum() == 4
    model.eval()
    spans = model.model.get_image_features(images).last_hidden_state.unflatten(0, (2, 9))
    for span in spans:
        assert not (span[1:] == mask_token).all(-1).any()


def test_understanding_noise_only_in_training_mode(tokenizer):
    model = tiny_model(tokenizer, understanding_noise_prob=1.0, understanding_noise_level=0.1)
    roles = torch.tensor([Tuna2ImageRole.UNDERSTANDING, Tuna2ImageRole.CONDITION, Tuna2ImageRole.UNDERSTANDING])
    model.train()
    t = model.training_timesteps(roles)
    assert t[1] == 1 and (t[[0, 2]] < 1).all() and (t[[0, 2]] >= 0.9).all()
    model.eval()
    assert (model.training_timesteps(roles) == 1).all()


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, train_processor, data):
    batch = one_batch(data, train_processor)
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model(tokenizer).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(11)
        model(**batch).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 50
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, atol=1e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_only_adapters_and_reloads_everywhere(tokenizer, train_processor, data, tmp_path):
    base = tiny_model(tokenizer)
    base_state = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules("all"))
    trainer = trainer_for(
        base, train_processor, data, tmp_path, steps=3, batch_size=4, learning_rate=1e-2, peft_config=peft_config
    )
    trainer.train()
    trained = trainer.model.eval()
    changed = {
        name
        for name, tensor in trained.named_parameters()
        if "lora_" in name and not torch.equal(tensor, torch.zeros_like(tensor))
    }
    assert any("language_model" in name for name in changed) and any("flow_head" in name for name in changed)
    for name, tensor in trained.get_base_model().state_dict().items():
        if "lora_" not in name:
            original = name.replace(".base_layer", "")
            assert torch.equal(tensor, base_state[original]), f"{name} changed"
    trainer.save_model(str(tmp_path / "adapter"))

    batch = one_batch(data, train_processor, count=2)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    timesteps = torch.full((len(batch["pixel_values"]),), 0.4)
    every_image = torch.full((len(batch["pixel_values"]),), Tuna2ImageRole.TARGET)

    def outputs(model):
        with torch.no_grad():
            return model(**inputs).logits, model(**inputs, timesteps=timesteps, image_roles=every_image).x0

    expected_logits, expected_x0 = outputs(trained)

    loaded = tiny_model(tokenizer)
    loaded.load_adapter(str(tmp_path / "adapter"))
    for got, want in zip(outputs(loaded), (expected_logits, expected_x0)):
        assert torch.equal(got, want)

    peft_model = PeftModel.from_pretrained(tiny_model(tokenizer), str(tmp_path / "adapter")).eval()
    for got, want in zip(outputs(peft_model), (expected_logits, expected_x0)):
        assert torch.equal(got, want)
    merged = peft_model.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    for got, want in zip(outputs(merged), (expected_logits, expected_x0)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    pipe = Tuna2Pipeline(model=tiny_model(tokenizer), processor=train_processor)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=32, width=32, num_inference_steps=2, output_type="latent", negative_prompt="blurry")
    before = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(tmp_path / "adapter")
    with_lora = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    reference = Tuna2Pipeline(model=trained, processor=train_processor)
    reference.set_progress_bar_config(disable=True)
    assert torch.equal(
        with_lora, reference("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    )
    pipe.unload_lora_weights()
    assert torch.equal(before, pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images)


@pytest.mark.parametrize(
    "targets, present, absent", [("llm", "language_model", "flow_head"), ("flow_head", "flow_head", "language_model")]
)
def test_lora_targets_are_selectable(tokenizer, targets, present, absent):
    from peft import get_peft_model

    model = get_peft_model(tiny_model(tokenizer), LoraConfig(r=2, target_modules=lora_target_modules(targets)))
    names = [name for name, _ in model.named_parameters() if "lora_A" in name]
    assert names and all(present in name and absent not in name for name in names)
    with pytest.raises(ValueError, match="LoRA targets must be one of"):
        lora_target_modules("vision")


# ---------------------------------------------------------------------------------------------------- bad data


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_samples_name_file_and_line(data, tmp_path, caplog):
    root = data["t2i"].parent
    good = '{"image": "%s/red_circle.png", "caption": "a red circle"}' % root
    cases = {
        "malformed JSON": ("t2i", [good, '{"image": "x.png", "caption": '], 2),
        "image file not found": ("t2i", [good, '{"image": "missing.png", "caption": "gone"}'], 2),
        "no assistant turn": (
            "mmu",
            [
                '{"image": "%s/red_circle.png", "conversations": [{"from": "human", "value": "Colour?"}, '
                '{"from": "gpt", "value": "Red."}]}' % root,
                '{"image": "%s/red_circle.png", "conversations": [{"from": "human", "value": "Hi?"}]}' % root,
            ],
            2,
        ),
    }
    for message, (task, lines, bad_line) in cases.items():
        path = write(tmp_path / f"{task}.jsonl", lines)
        with pytest.raises(Tuna2DataError, match=rf"{path}:{bad_line}: .*{message}"):
            read_jsonl(path, task, image_root=tmp_path)
        with caplog.at_level(logging.WARNING):
            samples = read_jsonl(path, task, image_root=tmp_path, skip_bad_samples=True)
        assert len(samples) == 1 and f"{path}:{bad_line}" in caplog.text

    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    path = write(tmp_path / "broken.jsonl", ['{"image": "broken.png", "caption": "broken"}'])
    dataset = Tuna2MixtureDataset({"t2i": read_jsonl(path, "t2i")}, length=1)
    with pytest.raises(Tuna2DataError, match=rf"{path}:1: cannot decode image"):
        dataset[0]
    streams = {"t2i": read_jsonl(path, "t2i") + read_jsonl(data["t2i"], "t2i")}
    skipping = Tuna2MixtureDataset(streams, length=20, skip_bad_samples=True)
    with caplog.at_level(logging.WARNING):
        items = [skipping[i] for i in range(20)]
    assert all(item["sample"].origin != f"{path}:1" for item in items)
    assert "cannot decode image" in caplog.text


def test_sft_script_reports_bad_data(tmp_path, tokenizer, train_processor, data):
    tiny_model(tokenizer).save_pretrained(tmp_path / "model")
    train_processor.save_pretrained(tmp_path / "model")
    bad = write(tmp_path / "bad.jsonl", ['{"image": "nope.png", "caption": "x"}'])
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "sft.py"),
            "--model",
            str(tmp_path / "model"),
            "--data",
            f"t2i={bad}",
            "--output",
            str(tmp_path / "out"),
            "--max-steps",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert f"{bad}:1: image file not found" in result.stderr


# ---------------------------------------------------------------------------------------------------- distributed


def test_two_process_cpu_run_of_sft_script(tmp_path, tokenizer, train_processor, data):
    tiny_model(tokenizer).save_pretrained(tmp_path / "model")
    train_processor.save_pretrained(tmp_path / "model")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "examples" / "accelerate" / "cpu_ddp.yaml"),
        "--main_process_port",
        "29531",
        str(ROOT / "examples" / "sft.py"),
        "--model",
        str(tmp_path / "model"),
        "--data",
        *(f"{task}={path}" for task, path in data.items()),
        "--output",
        str(tmp_path / "out"),
        "--no-lora",
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--image-size",
        "32",
        "--learning-rate",
        "1e-3",
        "--logging-steps",
        "1",
        "--loss-log",
        str(tmp_path / "losses"),
        "--save-steps",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    logs = [json.loads((tmp_path / f"losses.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(logs[0]) == 4
    assert [entry["loss"] for entry in logs[0]] == [entry["loss"] for entry in logs[1]]
    saved = Tuna2Pipeline.from_pretrained(tmp_path / "out")
    assert isinstance(saved.model, Tuna2ForConditionalGeneration)
    # Intermediate checkpoints load in the pipeline too, with the input checkpoint's sampling defaults.
    checkpoint = Tuna2Pipeline.from_pretrained(tmp_path / "out" / "checkpoint-2")
    assert checkpoint.config.negative_prompt == saved.config.negative_prompt


# ---------------------------------------------------------------------------------------------------- task batches


def synthetic_streams(sizes: dict[str, int]) -> dict:
    """Streams of PIL-free text samples (loading them reads no file), `sizes[task]` samples each."""
    return {
        task: [Tuna2Sample(task, f"{task}:{i}", text=f"{task} {i}") for i in range(size)]
        for task, size in sizes.items()
    }


def test_task_batches_hold_one_task_and_take_turns_by_weight():
    streams = synthetic_streams({"t2i": 10, "mmu": 7, "edit": 5})
    weights = {"t2i": 0.5, "mmu": 0.25, "edit": 0.25}
    dataset = Tuna2MixtureDataset(streams, weights, length=4 * 40, seed=1, task_batch_size=4)
    blocks = [[dataset[4 * b + i]["sample"].task for i in range(4)] for b in range(40)]
    assert all(len(set(block)) == 1 for block in blocks)
    tasks = [block[0] for block in blocks]
    # Smooth round-robin: every window of four blocks is t2i twice, mmu once, edit once (joint updates under
    # gradient accumulation over 4 micro-batches), and so are the totals.
    for start in range(0, 40, 4):
        window = tasks[start : start + 4]
        assert (window.count("t2i"), window.count("mmu"), window.count("edit")) == (2, 1, 1)


def test_task_batches_read_each_stream_in_whole_shuffled_passes():
    streams = synthetic_streams({"t2i": 6, "mmu": 9})
    dataset = Tuna2MixtureDataset(streams, {"t2i": 1.0, "mmu": 1.0}, length=3 * 36, seed=0, task_batch_size=3)
    drawn = {"t2i": [], "mmu": []}
    for index in range(len(dataset)):
        sample = dataset[index]["sample"]
        drawn[sample.task].append(sample.origin)
    for task, origins in drawn.items():
        size = len(streams[task])
        passes = [origins[k : k + size] for k in range(0, len(origins) - size + 1, size)]
        assert len(passes) >= 2
        assert all(sorted(p) == sorted(s.origin for s in streams[task]) for p in passes)  # every sample once
        assert passes[0] != passes[1]  # reshuffled between passes
    # Reproducible from the seed and the index, in any order of access.
    again = Tuna2MixtureDataset(streams, {"t2i": 1.0, "mmu": 1.0}, length=3 * 36, seed=0, task_batch_size=3)
    assert [again[i]["sample"].origin for i in reversed(range(30))] == [
        dataset[i]["sample"].origin for i in reversed(range(30))
    ]


def test_mixed_batches_follow_the_weights():
    streams = synthetic_streams({"t2i": 10, "mmu": 10, "edit": 10, "text": 10})
    weights = {"t2i": 0.5, "edit": 0.2, "mmu": 0.2, "text": 0.1}
    dataset = Tuna2MixtureDataset(streams, weights, length=4000, seed=0)
    counts = {task: 0 for task in weights}
    for index in range(len(dataset)):
        counts[dataset[index]["sample"].task] += 1
    for task, weight in weights.items():
        assert abs(counts[task] / len(dataset) - weight) < 0.03, counts


def test_task_batches_through_the_trainer(tokenizer, train_processor, data, tmp_path):
    """Read in order, each micro-batch the Trainer builds holds one task, and less padding than mixed batches."""
    streams = {task: read_jsonl(path, task) for task, path in data.items()}
    grouped = Tuna2MixtureDataset(streams, length=4 * 8, task_batch_size=4)
    trainer = trainer_for(
        tiny_model(tokenizer), train_processor, data, tmp_path, 8, 4, 1e-3, train_sampling_strategy="sequential"
    )
    trainer.train_dataset = grouped.to_hf_dataset()
    padding = []
    for batch in trainer.get_train_dataloader():
        roles = batch.get("image_roles")
        has_target = roles is not None and (roles == int(Tuna2ImageRole.TARGET)).any()
        has_understanding = roles is not None and (roles == int(Tuna2ImageRole.UNDERSTANDING)).any()
        has_condition = roles is not None and (roles == int(Tuna2ImageRole.CONDITION)).any()
        assert not (has_target and has_understanding) and not (has_understanding and has_condition)
        padding.append((batch["attention_mask"] == 0).sum().item())
    mixed = Tuna2Collator(train_processor, image_size=32)
    mixed_dataset = mixture(data, 4 * 8)
    mixed_padding = sum(
        (mixed([mixed_dataset[4 * b + i] for i in range(4)])["attention_mask"] == 0).sum().item() for b in range(8)
    )
    assert len(padding) == 8 and sum(padding) < mixed_padding
