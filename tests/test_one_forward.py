"""One forward for every mode: with `image_roles` it honours the standard arguments (`position_ids`,
`past_key_values`, `logits_to_keep`); a `Tuna2Cache` keeps both stacks in step; the pipeline calls nothing of the
model but its forward, so that `enable_model_cpu_offload()` works through accelerate's hooks."""

import inspect

import pytest
import torch

from diffusers_tuna2 import Tuna2Pipeline
from transformers_tuna2 import Tuna2Cache, Tuna2ImageRole
from tuna2_training.tiny import tiny_model

TARGET = Tuna2ImageRole.TARGET


def text_to_image_inputs(processor, prompts, height=32, width=48):
    """The pipeline's layout of `prompts` (left-padded prefixes, the span, the suffix) and one noisy image each."""
    inputs = processor.generation_inputs(prompts, height, width)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(len(prompts), 3, height, width, generator=generator)
    return inputs, images


def full_sequence(inputs):
    input_ids = torch.cat([inputs["input_ids"], inputs["span_ids"], inputs["suffix_ids"]], dim=1)
    attention_mask = torch.cat(
        [inputs["attention_mask"], torch.ones_like(input_ids[:, inputs["input_ids"].shape[1] :])], 1
    )
    return input_ids, attention_mask


def test_a_cached_prefix_gives_the_x0_and_logits_of_the_whole_sequence(processor, model):
    inputs, images = text_to_image_inputs(processor, ["a red circle", "a much longer prompt about a blue square"])
    input_ids, attention_mask = full_sequence(inputs)
    t, roles = torch.tensor([0.3, 0.7]), torch.full((2,), TARGET)
    span_length = inputs["span_ids"].shape[1]
    with torch.no_grad():
        whole = model(input_ids, images, t, roles, attention_mask=attention_mask)
        cache = Tuna2Cache(config=model.config)
        prefix = model(
            inputs["input_ids"], attention_mask=inputs["attention_mask"], past_key_values=cache, use_cache=True
        )
        prefix_length = inputs["input_ids"].shape[1]
        assert prefix.past_key_values is cache and prefix.x0 is None
        assert cache.language_model.get_seq_length() == cache.flow_head.get_seq_length() == prefix_length
        span_mask = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["span_ids"])], dim=1)
        cached = model(inputs["span_ids"], images, t, roles, attention_mask=span_mask, past_key_values=cache)
        assert cache.get_seq_length() == cache.flow_head.get_seq_length() == prefix_length + span_length
        cache.crop(-span_length)
        assert cache.language_model.get_seq_length() == cache.flow_head.get_seq_length() == prefix_length
        again = model(inputs["span_ids"], images, t, roles, attention_mask=span_mask, past_key_values=cache)
    torch.testing.assert_close(cached.x0, whole.x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again.x0, cached.x0, atol=0, rtol=0)
    span = slice(prefix_length, prefix_length + span_length)
    torch.testing.assert_close(cached.logits, whole.logits[:, span], atol=1e-5, rtol=1e-5)


def test_generating_after_a_language_model_cache_alone_is_refused(processor, model):
    inputs, images = text_to_image_inputs(processor, ["a red circle"])
    with torch.no_grad():
        cache = model(inputs["input_ids"], use_cache=True).past_key_values
        span_mask = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["span_ids"])], dim=1)
        with pytest.raises(ValueError, match="needs a Tuna2Cache"):
            model(inputs["span_ids"], images, torch.tensor([0.5]), [TARGET], span_mask, past_key_values=cache)


def test_logits_to_keep_cuts_the_logits_and_leaves_x0(processor, model):
    inputs, images = text_to_image_inputs(processor, ["a red circle"])
    input_ids, attention_mask = full_sequence(inputs)
    arguments = dict(
        pixel_values=images, timesteps=torch.tensor([0.4]), image_roles=[TARGET], attention_mask=attention_mask
    )
    with torch.no_grad():
        every = model(input_ids, **arguments)
        last = model(input_ids, **arguments, logits_to_keep=1)
        chosen = model(input_ids, **arguments, logits_to_keep=torch.tensor([0, 3]))
    assert every.logits.shape[1] == input_ids.shape[1] and last.logits.shape[1] == 1
    torch.testing.assert_close(last.logits, every.logits[:, -1:])
    torch.testing.assert_close(chosen.logits, every.logits[:, [0, 3]])
    assert torch.equal(last.x0, every.x0) and torch.equal(chosen.x0, every.x0)


def test_position_ids_are_used_by_both_stacks(processor, model):
    inputs, images = text_to_image_inputs(processor, ["a red circle"])
    input_ids, _ = full_sequence(inputs)
    arguments = dict(pixel_values=images, timesteps=torch.tensor([0.4]), image_roles=[TARGET])
    default = torch.arange(input_ids.shape[1])[None]
    with_gap = default + (default >= 2) * 5  # five positions skipped after the second token
    with torch.no_grad():
        implicit = model(input_ids, **arguments)
        explicit = model(input_ids, **arguments, position_ids=default)
        gapped = model(input_ids, **arguments, position_ids=with_gap)
        # The language model alone with the gapped positions: the flow head reads these hidden states.
        hidden = model.model(input_ids, images, torch.tensor([0.4]), position_ids=with_gap).last_hidden_state
        implicit_hidden = model.model(input_ids, images, torch.tensor([0.4])).last_hidden_state
    assert torch.equal(explicit.x0, implicit.x0) and torch.equal(explicit.logits, implicit.logits)
    assert not torch.allclose(hidden, implicit_hidden)
    assert not torch.allclose(gapped.x0, implicit.x0)
    torch.testing.assert_close(gapped.logits, model.lm_head(hidden))


def model_methods(model):
    """The methods of the Tuna-2 classes themselves, the model's and its inner model's (forward aside)."""
    methods = []
    for module in (model, model.model):
        for cls in type(module).__mro__:
            if not cls.__module__.startswith("transformers_tuna2"):
                continue
            for name, value in vars(cls).items():
                if inspect.isfunction(value) and name != "forward" and not name.startswith("__"):
                    methods.append((module, name))
    return methods


def test_the_pipeline_calls_only_forward_and_offloads_through_the_hooks(processor, tokenizer, monkeypatch):
    model = tiny_model(tokenizer).eval()
    pipe = Tuna2Pipeline(model=model, processor=processor)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=32, width=48, num_inference_steps=3, guidance_scale=2.0, output_type="latent")
    expected = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images

    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe._execution_device == torch.device("cpu:0")
    inside_forward, outside_calls, moves = [0], [], []
    model.register_forward_pre_hook(lambda module, args: inside_forward.__setitem__(0, inside_forward[0] + 1))
    model.register_forward_hook(lambda module, args, output: inside_forward.__setitem__(0, inside_forward[0] - 1))
    for module, name in model_methods(model):
        method = getattr(module, name)

        def guarded(*args, _name=name, _method=method, **kw):
            if not inside_forward[0]:
                outside_calls.append(_name)
            return _method(*args, **kw)

        monkeypatch.setattr(module, name, guarded)
    # accelerate's offload hook moves the model with `to` to the execution device before each forward (the model is
    # local to this test: the recorder is not removed afterwards).
    original_to = model.to

    def recording_to(*args, **kw):
        moves.append(torch.device(args[0]) if args else kw.get("device"))
        return original_to(*args, **kw)

    model.to = recording_to
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1), prepend=True)
    offloaded = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images

    assert outside_calls == []
    assert len(calls) == 1 + 3  # the prefix, then one call per step
    assert moves[: len(calls)] == [torch.device("cpu:0")] * len(calls)
    # After the last step, diffusers' `maybe_free_model_hooks` re-arms the offload (recent diffusers), moving the
    # model to the offload device.
    assert all(device == torch.device("cpu") for device in moves[len(calls) :])
    assert torch.equal(offloaded, expected)


def test_the_cache_repeats_and_selects_rows_in_both_stacks(processor, model):
    inputs, _ = text_to_image_inputs(processor, ["a red circle"])
    cache = Tuna2Cache(config=model.config)
    with torch.no_grad():
        model(inputs["input_ids"], attention_mask=inputs["attention_mask"], past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(3)
    assert cache.language_model.layers[0].keys.shape[0] == cache.flow_head.layers[0].keys.shape[0] == 3
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.language_model.layers[0].keys.shape[0] == cache.flow_head.layers[0].keys.shape[0] == 2
