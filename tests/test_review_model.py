"""The model's answers to a maintainer review: eval forwards are deterministic, the LM head runs where labels are,
the flow head's rotary tables follow a split model's blocks, sliding-window language models, one initialisation,
remote code on request, and default RoPE past `max_position_embeddings`."""

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook, add_hook_to_module, remove_hook_from_module
from transformers import AutoModelForImageTextToText

from transformers_tuna2 import Tuna2Cache, Tuna2ForConditionalGeneration, Tuna2ImageRole
from transformers_tuna2.modeling_tuna2 import Tuna2ModelOutputWithPast
from tuna2_training.tiny import tiny_config, tiny_model

TARGET = torch.tensor([Tuna2ImageRole.TARGET])


def image_prompt(processor, model):
    """`input_ids`, `attention_mask` and `pixel_values` of one image and a caption, and the caption's labels."""
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    inputs = processor(text=f"Draw {processor.image_token} a red circle", images=[image], return_tensors="pt")
    labels = inputs.input_ids.masked_fill(inputs.input_ids == model.config.image_token_id, -100)
    return inputs, labels


# ------------------------------------------------------------------------------------------------ eval draws nothing


def test_eval_forward_with_target_images_needs_timesteps(processor, model):
    inputs, _ = image_prompt(processor, model)
    with torch.no_grad(), pytest.raises(ValueError, match="TARGET images need their `timesteps` in eval mode"):
        model(**inputs, image_roles=TARGET)


def test_eval_forward_draws_nothing(processor, model):
    """Two identical eval calls give the same x0; understanding images without timesteps are read clean, as without
    roles."""
    inputs, _ = image_prompt(processor, model)
    with torch.no_grad():
        first = model(**inputs, image_roles=TARGET, timesteps=torch.tensor([0.3])).x0
        second = model(**inputs, image_roles=TARGET, timesteps=torch.tensor([0.3])).x0
        understanding = model(**inputs, image_roles=torch.tensor([Tuna2ImageRole.UNDERSTANDING])).logits
        plain = model(**inputs).logits
    assert torch.equal(first, second)
    assert torch.equal(understanding, plain)


def test_training_mode_still_noises_a_training_batch(processor, tokenizer):
    model = tiny_model(tokenizer).train()
    inputs, _ = image_prompt(processor, model)
    outputs = model(**inputs, image_roles=TARGET)
    assert outputs.flow_loss > 0 and outputs.x0.shape == inputs.pixel_values.shape


# ------------------------------------------------------------------------------------------------ LM head on labels


def no_random_training(tokenizer):
    """A tiny model whose training mode draws nothing that changes its outputs (no masked patches, no noise on
    understanding images)."""
    return tiny_model(tokenizer, mask_ratio_max=0.0, understanding_noise_prob=0.0)


def test_training_computes_logits_of_the_labelled_positions_only(processor, tokenizer):
    model = no_random_training(tokenizer)
    inputs, labels = image_prompt(processor, model)
    num_labelled = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        evaluated = model.eval()(**inputs, labels=labels)
        trained = model.train()(**inputs, labels=labels)
    assert trained.logits.shape == (num_labelled, model.config.text_config.vocab_size)
    assert evaluated.logits.shape == (*labels.shape, model.config.text_config.vocab_size)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(trained.logits, evaluated.logits[shifted != -100])
    torch.testing.assert_close(trained.lm_loss, evaluated.lm_loss)


def test_a_batch_without_labels_gives_the_lm_head_a_zero_gradient(processor, tokenizer):
    """A generation batch: the LM head runs on no position and still gets a gradient (zeros), as DDP and gradient
    accumulation expect of every parameter."""
    model = no_random_training(tokenizer).train()
    inputs, labels = image_prompt(processor, model)
    outputs = model(**inputs, labels=torch.full_like(labels, -100), image_roles=TARGET)
    assert outputs.logits.shape[0] == 0 and outputs.lm_loss == 0
    outputs.loss.backward()
    assert model.lm_head.weight.grad is not None and not model.lm_head.weight.grad.any()
    assert model.flow_head.final_layer.linear.weight.grad.any()


def test_num_items_in_batch_normalises_the_summed_loss(processor, tokenizer):
    model = no_random_training(tokenizer).train()
    inputs, labels = image_prompt(processor, model)
    with torch.no_grad():
        mean = model(**inputs, labels=labels).lm_loss
        over_more = model(**inputs, labels=labels, num_items_in_batch=torch.tensor(100)).lm_loss
    num_labelled = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(over_more, mean * num_labelled / 100)


# ---------------------------------------------------------------------------------------------------- split models


class StopAfterRecording(Exception):
    pass


class RecordFlowHeadInputs(ModelHook):
    """Records the devices of a flow-head block's tensor inputs, as the block would receive them, then stops."""

    def __init__(self, record: dict):
        self.record = record

    def pre_forward(self, module, *args, **kwargs):
        hidden_states, time_embeds, image_index, rotary, attention_mask = args[:5]
        self.record["rotary"] = {name: tensor.device for name, tensor in rotary._asdict().items()}
        self.record["others"] = [t.device for t in (hidden_states, time_embeds, image_index) if t is not None]
        raise StopAfterRecording


def test_each_flow_head_block_gets_its_rotary_tables_on_its_own_device(processor, tokenizer):
    """What `device_map` does to a model split over devices: accelerate's hook on each block moves the block's inputs
    to its execution device. On this CPU-only machine the second device is `meta`: each block in turn executes
    there, and every rotary table it receives (cos/sin of text and patches, the position masks) must be on it."""
    model = tiny_model(tokenizer, flow_head_num_layers=3)
    inputs, _ = image_prompt(processor, model)
    for block in model.flow_head.layers:
        record = {}
        hook = SequentialHook(AlignDevicesHook(execution_device=torch.device("meta")), RecordFlowHeadInputs(record))
        add_hook_to_module(block, hook)
        try:
            with torch.no_grad(), pytest.raises(StopAfterRecording):
                model(**inputs, image_roles=TARGET, timesteps=torch.tensor([0.5]))
        finally:
            remove_hook_from_module(block)
        assert record["rotary"] == dict.fromkeys(record["rotary"], torch.device("meta")), record["rotary"]
        assert set(record["others"]) == {torch.device("meta")}


def test_rotary_frequencies_are_fp32_and_copied_once_per_device(processor, tokenizer):
    model = tiny_model(tokenizer).to(torch.bfloat16)
    inputs, _ = image_prompt(processor, model)
    inputs["pixel_values"] = inputs.pixel_values.bfloat16()
    rotary_emb = model.flow_head.rotary_emb
    with torch.no_grad():
        for _ in range(2):
            model(**inputs, image_roles=TARGET, timesteps=torch.tensor([0.5]))
    assert list(rotary_emb.frequencies_by_device) == [torch.device("cpu")]
    text_inv_freq, image_omegas = rotary_emb.frequencies_by_device[torch.device("cpu")]
    assert text_inv_freq.dtype == torch.float32 and all(omega.dtype == torch.float32 for omega in image_omegas)


# ---------------------------------------------------------------------------------------------------- sliding window


def sliding_model(tokenizer, window: int) -> Tuna2ForConditionalGeneration:
    config = tiny_config(tokenizer)
    text_config = config.text_config.to_dict()
    text_config.update(use_sliding_window=True, sliding_window=window, max_window_layers=1, layer_types=None)
    config = tiny_config(tokenizer, text_config=text_config)
    assert config.text_config.layer_types == ["full_attention", "sliding_attention"]
    return Tuna2ForConditionalGeneration(config).eval()


def test_sliding_window_layers_get_their_own_masks(processor, tokenizer, model):
    inputs, _ = image_prompt(processor, model)
    as_target = {"image_roles": TARGET, "timesteps": torch.tensor([0.5])}
    wide, narrow = sliding_model(tokenizer, window=4096), sliding_model(tokenizer, window=4)
    wide.load_state_dict(model.state_dict())
    narrow.load_state_dict(model.state_dict())
    with torch.no_grad():
        full = model(**inputs, **as_target)
        within_window = wide(**inputs, **as_target)
        windowed = narrow(**inputs, **as_target)
    # A window longer than the sequence is full attention; a short one changes what the text positions see.
    torch.testing.assert_close(within_window.logits, full.logits)
    torch.testing.assert_close(within_window.x0, full.x0)
    assert not torch.allclose(windowed.logits[:, -1], full.logits[:, -1])


def test_sliding_window_model_denoises_after_a_cached_prefix(processor, tokenizer, model):
    """The denoising step (one whole span per row after a cached prefix) builds the bidirectional masks of both
    layer types."""
    inputs, _ = image_prompt(processor, model)
    wide = sliding_model(tokenizer, window=4096)
    wide.load_state_dict(model.state_dict())
    span = inputs.input_ids == model.config.image_token_id
    start, end = int(span[0].nonzero()[0]), int(span[0].nonzero()[-1]) + 1
    with torch.no_grad():
        uncached = model(**inputs, image_roles=TARGET, timesteps=torch.tensor([0.5])).x0
        cache = Tuna2Cache(config=wide.config)
        wide(input_ids=inputs.input_ids[:, :start], past_key_values=cache, use_cache=True)
        step = wide(
            input_ids=inputs.input_ids[:, start:end],
            pixel_values=inputs.pixel_values,
            timesteps=torch.tensor([0.5]),
            image_roles=TARGET,
            past_key_values=cache,
            use_cache=True,
        ).x0
    torch.testing.assert_close(step, uncached, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- initialisation


def test_new_parts_start_from_the_official_initialisation(tokenizer):
    """`_init_weights` is the one initialisation (`init_tuna2_from_qwen2` calls it): flow-head linears keep PyTorch's
    default (kaiming-uniform, the official model's start), timestep MLP weights N(0, 0.02) with PyTorch's default
    biases, adaLN-Zero."""
    torch.manual_seed(0)
    model = Tuna2ForConditionalGeneration(tiny_config(tokenizer))
    block = model.flow_head.layers[0]
    for linear in (block.self_attn.q_proj, block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.down_proj):
        bound = 1 / math.sqrt(linear.in_features)  # kaiming-uniform with a=sqrt(5)
        assert linear.weight.abs().max() <= bound
        assert linear.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    for linear in (model.model.time_embed.mlp[0], model.model.time_embed.mlp[2]):
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.1)
        bound = 1 / math.sqrt(linear.in_features)
        assert linear.bias.abs().max() <= bound and linear.bias.std().item() == pytest.approx(
            bound / math.sqrt(3), rel=0.2
        )
    assert not block.adaLN_modulation[1].weight.any() and not model.flow_head.final_layer.linear.weight.any()


# ---------------------------------------------------------------------------------------------------- long inputs


def test_default_rope_runs_past_max_position_embeddings(tokenizer):
    """As transformers' models do: no error (the rotation is defined at every position)."""
    config = tiny_config(tokenizer)
    config.text_config.max_position_embeddings = 64
    model = Tuna2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.full((1, 120), 5)).logits
    assert logits.shape[1] == 120 and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------- remote code


def test_saving_copies_no_code_unless_asked(tmp_path, tokenizer, processor):
    """Importing the package registers the Auto classes in the process only: a saved folder holds no code copies and
    no `auto_map` (`transformers_tuna2.register_for_auto_class()` asks for them; tests/test_save_load.py loads such a
    folder without the package)."""
    model = tiny_model(tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.py"))
    for path in tmp_path.glob("*.json"):
        assert "auto_map" not in json.loads(path.read_text()), path.name
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is Tuna2ForConditionalGeneration


# ---------------------------------------------------------------------------------------------------- outputs


def test_base_model_output_holds_what_users_read(processor, model):
    """No image spans, positions, masks or attention flags: the flow head reads those from the inputs itself."""
    inputs, _ = image_prompt(processor, model)
    with torch.no_grad():
        outputs = model.model(**inputs, timesteps=torch.tensor([0.5]), use_cache=True, output_hidden_states=True)
    assert list(outputs.keys()) == ["last_hidden_state", "cache", "hidden_states", "time_embeds"]
    assert set(Tuna2ModelOutputWithPast.__dataclass_fields__) == {
        "last_hidden_state",
        "cache",
        "hidden_states",
        "attentions",
        "time_embeds",
    }
    assert "to_tuple" not in vars(Tuna2ModelOutputWithPast)
