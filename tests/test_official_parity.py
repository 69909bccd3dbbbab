"""Our model with the official fixture weights against the official implementation's own outputs (fp32)."""

import pytest
import torch

from transformers_tuna2 import Tuna2ImageRole

CASES = ["t2i_64x64", "t2i_64x96"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("step", [0, 1])
def test_text_to_image_x0_of_both_cfg_branches(official_model, official_reference, case, step):
    ids = official_reference[f"{case}.input_ids"]  # (cond, uncond), right-padded with [PAD] as officially
    z = official_reference[f"{case}.z_steps"][step][:, 0]
    t = official_reference[f"{case}.t_steps"][step]
    with torch.no_grad():
        roles = torch.full((2,), Tuna2ImageRole.TARGET)
        x0 = official_model(ids, torch.stack([z, z]), timesteps=torch.stack([t, t]), image_roles=roles).x0
    expected = official_reference[f"{case}.x0_branches"][step][:, :, 0]
    torch.testing.assert_close(x0, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("step", [0, 1])
def test_editing_x0_of_source_and_target_in_both_branches(official_model, official_reference, step):
    ids = official_reference["edit_64x64.input_ids"]
    source = official_reference["edit_64x64.source_pixels"][0]
    z = official_reference["edit_64x64.z_steps"][step][:, 0]
    t = official_reference["edit_64x64.t_steps"][step]
    one = torch.ones(())
    with torch.no_grad():
        x0 = official_model(  # every span's x0, the sources' too, as the official model computes them
            ids,
            torch.stack([source, z, source, z]),
            timesteps=torch.stack([one, t, one, t]),
            image_roles=torch.full((4,), Tuna2ImageRole.TARGET),
        ).x0
    torch.testing.assert_close(x0, official_reference["edit_64x64.x0_all"][step][:, :, 0], atol=1e-5, rtol=0)


def test_llm_hidden_states(official_model, official_reference):
    ids = official_reference["t2i_64x64.input_ids"]
    expected = official_reference["t2i_64x64.step0.llm_last_hidden"]
    z = official_reference["t2i_64x64.z_steps"][0][:, 0]
    t = official_reference["t2i_64x64.t_steps"][0]
    with torch.no_grad():
        hidden = official_model.model(
            input_ids=ids, pixel_values=torch.stack([z, z]), timesteps=torch.stack([t, t])
        ).last_hidden_state
    torch.testing.assert_close(hidden[:, : expected.shape[1]], expected, atol=1e-5, rtol=0)


def test_understanding_logits_and_greedy_tokens(official_model, official_reference):
    ids = official_reference["mmu_64x64.input_ids"]
    pixels = official_reference["mmu_64x64.pixel_values"]
    with torch.no_grad():
        logits = official_model(input_ids=ids, pixel_values=pixels).logits
        out = official_model.generate(
            input_ids=ids,
            pixel_values=pixels,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    torch.testing.assert_close(logits, official_reference["mmu_64x64.prefill_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(out.logits), official_reference["mmu_64x64.step_logits"], atol=1e-4, rtol=0)
    assert out.sequences[0, ids.shape[1] :].tolist() == official_reference["mmu_64x64.output_ids"].tolist()
