"""benchmarks/shapes_7b.py: the official 7B shapes of its checkpoint builder, its memory limit, and its small mode run
end to end (the same code as the 7B run, at tiny shapes)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import shapes_7b  # noqa: E402

GiB = 1024**3


def test_builder_writes_the_official_7b_shapes():
    """The keys and shapes of the official 7B checkpoint (the reference's state-dict table), from the meta device."""
    shapes = shapes_7b.official_shapes(small=False)
    assert len(shapes) == 560  # 559 inference keys and the training checkpoint's mask token
    assert all(key.startswith("tuna_model.") for key in shapes)
    expected = {
        "tuna.model.embed_tokens.weight": (151669, 3584),
        "tuna.lm_head.weight": (151669, 3584),
        "tuna.model.layers.27.self_attn.k_proj.weight": (512, 3584),
        "tuna.model.layers.27.mlp.down_proj.weight": (3584, 18944),
        "vision_encoder.patch_embedding.weight": (3584, 3, 16, 16),
        "time_embed.mlp.0.weight": (3584, 256),
        "diffusion_head_a.15.self_attn.k_proj.weight": (896, 3584),
        "diffusion_head_a.15.self_attn.q_norm.weight": (64,),
        "diffusion_head_a.15.mlp.gate_proj.weight": (18944, 3584),
        "diffusion_head_a.15.adaLN_modulation.1.weight": (21504, 3584),
        "diffusion_head_b.linear.weight": (768, 3584),
        "diffusion_head_b.adaLN_modulation.1.weight": (7168, 3584),
        "mask_token": (1, 1, 3584),
    }
    for key, shape in expected.items():
        assert shapes[f"tuna_model.{key}"] == shape, key
    assert "tuna_model.diffusion_head_a.16.mlp.up_proj.weight" not in shapes
    assert round(sum(math.prod(shape) for shape in shapes.values()) / 1e9, 2) == 12.66


def test_a_process_over_the_memory_limit_is_recorded_and_the_caller_goes_on(tmp_path):
    command = [sys.executable, "-c", "data = b'x' * (3 * 2**30); print(len(data))"]
    row = shapes_7b.measure(command, tmp_path / "log", int(1 * GiB), "tuna2-test")
    assert row["exit_code"] != 0
    assert row["out_of_memory"], row
    row = shapes_7b.measure([sys.executable, "-c", "data = b'x' * 2**28"], tmp_path / "log", int(2 * GiB), "tuna2-t")
    assert row["exit_code"] == 0 and not row["out_of_memory"]
    assert row["peak_rss_gib"] > 0.25


def test_small_mode_runs_every_step(tmp_path):
    """Build, convert, and the loading modes with every phase, at tiny shapes: each ends without error and measures
    what the table reports."""
    pytest.importorskip("torchao", minversion="0.15", reason="the int8 mode needs the `quant` extra (torchao)")
    workdir, result = tmp_path / "work", tmp_path / "result.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "shapes_7b.py"), "--small", "--keep", "--threads", "2"]
    command += ["--workdir", str(workdir), "--json", str(result), "--modes", "understanding", "int8"]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    rows = json.loads(result.read_text())["rows"]
    assert set(rows) == {"build", "convert-imports", "convert", "understanding", "int8"}
    for name, row in rows.items():
        assert row["exit_code"] == 0 and not row["out_of_memory"], (name, row["last_line"])

    # The builder's file is what the official trainer writes: a training checkpoint around the prefixed state dict.
    checkpoint = torch.load(workdir / "official" / "model.pt", mmap=True, weights_only=True)
    assert set(checkpoint) == {"model", "step", "optimizer", "lr_scheduler"}
    assert checkpoint["model"].keys() == shapes_7b.official_shapes(small=True).keys()
    embeddings = checkpoint["model"]["tuna_model.tuna.model.embed_tokens.weight"]
    assert embeddings.dtype == torch.bfloat16 and embeddings.shape[0] == 151669
    assert 0.018 < embeddings.float().std() < 0.022
    assert (checkpoint["model"]["tuna_model.tuna.model.norm.weight"] == 1).all()
    assert rows["build"]["parameters"] == sum(tensor.numel() for tensor in checkpoint["model"].values())

    assert rows["convert"]["shards"] >= 1 and rows["convert"]["output_gib"] > 0
    understanding, int8 = rows["understanding"], rows["int8"]
    assert understanding["generate"]["new_tokens"] == 8
    for phase in (understanding["decode"],):
        assert phase["bare_matmul_s"] > 0 and phase["efficiency"] > 0 and phase["top_ops"]
        assert phase["tokens"] == [1]
    assert int8["t2i"]["finite"] and int8["edit"]["finite"]
    assert math.isfinite(int8["lora"]["loss"]) and int8["lora"]["flow_loss"] is not None
    assert int8["lora"]["trainable_parameters"] > 0
    # Quantized weights are counted at their stored size: int8 holds fewer bytes than the bf16 understanding model's
    # language model, although it also holds the flow head.
    assert int8["weight_gib"] < understanding["weight_gib"] * 1.5

    table = shapes_7b.markdown(json.loads(result.read_text()))
    assert "| load | int8:" in table and "efficiency **" in table
    assert "failed" not in table and "does not fit" not in table
