import math

import pytest
import torch

from transformers_tuna2 import Tuna2Config, Tuna2ForConditionalGeneration, Tuna2ImageRole
from transformers_tuna2.modeling_tuna2 import Tuna2ImageSpans, unpatchify
from tuna2_training.tiny import tiny_config, tiny_model

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def random_images(n, height=32, width=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, height, width, generator=generator) * 2 - 1


def encode(processor, texts, pixel_values, **kwargs):
    """Token ids for texts whose placeholders are expanded for `pixel_values` (no resizing involved)."""
    texts = processor.expand_image_tokens([texts] if isinstance(texts, str) else texts, pixel_values)
    return processor.tokenizer(texts, return_tensors="pt", **kwargs)


def predict_every_image(model, inputs, pixel_values, timesteps=None):
    """The forward with every image a target: its x0 prediction (at t=1 unless `timesteps` are given) and logits."""
    num_images = len(pixel_values)
    return model(
        **inputs,
        pixel_values=pixel_values,
        timesteps=torch.ones(num_images) if timesteps is None else timesteps,
        image_roles=torch.full((num_images,), Tuna2ImageRole.TARGET),
    )


# ---------------------------------------------------------------------------------------------------- mask semantics


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_patch_change_reaches_own_image_and_later_tokens_only(tokenizer, processor, attn_implementation):
    model = tiny_model(tokenizer, output_layout="patch")
    model.set_attn_implementation(attn_implementation)
    images = random_images(2)
    inputs = encode(processor, f"edit this {IMAGE} into {IMAGE} please", images)
    changed = images.clone()
    changed[1, :, 16:32, 0:16] += 0.5  # patch 3 (row 1, col 0) of the second image
    with torch.no_grad():
        before = model.model(**inputs, pixel_values=images).last_hidden_state[0]
        after = model.model(**inputs, pixel_values=changed).last_hidden_state[0]
        x0_before = predict_every_image(model, inputs, images).x0
        x0_after = predict_every_image(model, inputs, changed).x0

    spans = Tuna2ImageSpans.from_input_ids(inputs.input_ids, model.config.image_token_id)
    target_span = (spans.image_index[0] == 1).nonzero().flatten()
    start, end = target_span[0].item(), target_span[-1].item() + 1
    changed_patch = start + 1 + 3
    differs = (before - after).abs().amax(-1) > 0
    assert not differs[:start].any(), "a token before the edited image changed"
    others_in_span = [p for p in range(start, end) if p != changed_patch]
    assert differs[others_in_span].all(), "bidirectional attention inside the span is missing"
    assert differs[end:].all(), "a later token did not see the edited patch"

    # Flow head ("patch" layout: x0 patch k comes from token k): the earlier source image is untouched, every
    # patch of the edited image moves.
    assert torch.equal(x0_before[0], x0_after[0])
    patch_change = (x0_before[1] - x0_after[1]).abs().unflatten(1, (2, 16)).unflatten(3, (3, 16)).amax((0, 2, 4))
    assert (patch_change > 0).all()


def test_sdpa_and_eager_agree(tokenizer, processor, model):
    images = random_images(1)
    inputs = encode(
        processor,
        [f"look {IMAGE} here", f"{IMAGE} and some more words"],
        torch.cat([images, images]),
        padding=True,
        padding_side="left",
    )
    eager = tiny_model(tokenizer)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out_sdpa = predict_every_image(model, inputs, torch.cat([images, images]))
        out_eager = predict_every_image(eager, inputs, torch.cat([images, images]))
    real = inputs.attention_mask.bool()
    torch.testing.assert_close(out_sdpa.logits[real], out_eager.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_sdpa.x0, out_eager.x0, atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_x0(tokenizer, processor, model):
    images = random_images(2, seed=3)
    texts = [f"short {IMAGE}", f"a much longer prompt with many more words {IMAGE}"]
    batch = encode(processor, texts, images, padding=True, padding_side="left")
    with torch.no_grad():
        batched = predict_every_image(model, batch, images).x0
        alone = [
            predict_every_image(model, encode(processor, t, images[i : i + 1]), images[i : i + 1]).x0
            for i, t in enumerate(texts)
        ]
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- RoPE


def test_image_rope_rotates_by_minus_theta_on_interleaved_pairs(tokenizer, processor, model):
    images = random_images(1, height=48, width=64)  # grid 3 x 4
    inputs = encode(processor, f"x {IMAGE}", images)
    spans = Tuna2ImageSpans.from_input_ids(inputs.input_ids, model.config.image_token_id)
    position_ids = torch.arange(inputs.input_ids.shape[1])[None]
    spans.grids = [(3, 4)]
    rotary = model.flow_head.rotary_emb(torch.float32, position_ids, spans)
    start = spans.span_position[0].tolist().index(0)

    head_dim = model.config.flow_head_head_dim
    patch = 6  # row 1, column 2
    position = start + 1 + patch
    sections = [(0, 16, 0), (16, 24, 1), (40, 24, 2)]  # (first channel, channels, grid coordinate)
    for first, width, coordinate in sections:
        for k in range(width // 2):
            channel = first + 2 * k
            theta = coordinate * 10000.0 ** (-2 * k / width)
            x = torch.zeros(1, 1, inputs.input_ids.shape[1], head_dim)
            x[..., channel] = 1.0
            rotated = rotary.apply(x)[0, 0, position]
            expected = torch.zeros(head_dim)
            expected[channel], expected[channel + 1] = math.cos(theta), -math.sin(theta)  # rotation by -theta
            torch.testing.assert_close(rotated, expected, atol=1e-6, rtol=0)

    x = torch.randn(1, 1, inputs.input_ids.shape[1], head_dim)
    assert torch.equal(rotary.apply(x)[0, 0, start], x[0, 0, start]), "the time slot must not be rotated"


def test_text_rope_uses_llama3_scaled_frequencies(tokenizer, processor, model):
    # Independent computation: inv_freq_i = 5e5^(-2i/64); wavelengths below 2048 stay, above 8192 are divided by
    # 32, between them s = (8192 / wavelength - 1) / 3 interpolates.
    expected = []
    for i in range(32):
        inv = 500000.0 ** (-2 * i / 64)
        wavelength = 2 * math.pi / inv
        if wavelength < 2048:
            expected.append(inv)
        elif wavelength > 8192:
            expected.append(inv / 32)
        else:
            s = (8192 / wavelength - 1) / 3
            expected.append((1 - s) * inv / 32 + s * inv)
    inv_freq = model.flow_head.rotary_emb.text_inv_freq
    torch.testing.assert_close(inv_freq.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    unchanged = [i for i in range(32) if math.isclose(inv_freq[i].item(), 500000.0 ** (-2 * i / 64), rel_tol=1e-6)]
    assert unchanged == list(range(15))

    images = random_images(1)
    inputs = encode(processor, f"{IMAGE} then text", images)
    spans = Tuna2ImageSpans.from_input_ids(inputs.input_ids, model.config.image_token_id)
    length = inputs.input_ids.shape[1]
    spans.grids = [(2, 3)]
    rotary = model.flow_head.rotary_emb(torch.float32, torch.arange(length)[None], spans)
    position = length - 1  # a text token after the image keeps counting through the span
    x = torch.zeros(1, 1, length, 64)
    x[..., 20] = 1.0  # rotate-half pairs channel 20 with channel 52
    theta = position * expected[20]
    rotated = rotary.apply(x)[0, 0, position]
    torch.testing.assert_close(rotated[[20, 52]], torch.tensor([math.cos(theta), math.sin(theta)]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- layouts


def test_raster_layout_token_holds_consecutive_raster_pixels():
    tokens = torch.arange(6 * 768, dtype=torch.float32).reshape(6, 768)
    image = unpatchify(tokens, (2, 3), 16, "raster")  # 32 x 48
    flat = image.permute(1, 2, 0).reshape(-1, 3)  # raster order, channel fastest
    assert torch.equal(flat[256:512].flatten(), tokens[1])


def test_patch_layout_token_is_patch():
    tokens = torch.randn(6, 768)
    image = unpatchify(tokens, (2, 3), 16, "patch")
    patch_4 = image[:, 16:32, 16:32]  # row 1, column 1
    assert torch.equal(patch_4.permute(1, 2, 0).reshape(-1), tokens[4])


# ---------------------------------------------------------------------------------------------------- generate


def test_generate_with_cache_equals_recomputation(processor, model):
    images = random_images(1, seed=5)
    inputs = encode(processor, f"<|im_start|>user\n{IMAGE}\nWhat is here?<|im_end|>\n<|im_start|>assistant\n", images)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            pixel_values=images,
            max_new_tokens=6,
            do_sample=False,
            min_new_tokens=6,
            output_logits=True,
            return_dict_in_generate=True,
        )
        ids = inputs.input_ids
        for step in range(6):
            logits = model(input_ids=ids, pixel_values=images, use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[step], logits, atol=1e-5, rtol=1e-5)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, ids)


def test_generate_left_padded_batch_equals_each_prompt_alone(processor, model):
    images = random_images(2, seed=7)
    texts = [f"{IMAGE}\nWhat colour?", f"<|im_start|>user\n{IMAGE}\nHow many shapes are there in total?"]
    batch = encode(processor, texts, images, padding=True, padding_side="left")
    kwargs = dict(
        max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        batched = model.generate(**batch, pixel_values=images, **kwargs)
        for i, text in enumerate(texts):
            alone_inputs = encode(processor, text, images[i : i + 1])
            alone = model.generate(**alone_inputs, pixel_values=images[i : i + 1], **kwargs)
            new = alone.sequences[0, alone_inputs.input_ids.shape[1] :]
            assert torch.equal(batched.sequences[i, batch.input_ids.shape[1] :], new)
            for step in range(5):
                torch.testing.assert_close(batched.logits[step][i], alone.logits[step][0], atol=1e-5, rtol=1e-5)


def test_generate_sampling_is_seeded(processor, model):
    images = random_images(1)
    inputs = encode(processor, f"{IMAGE} describe", images)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(**inputs, pixel_values=images, do_sample=True, top_k=20, max_new_tokens=5))
    assert torch.equal(runs[0], runs[1])


def test_images_of_different_sizes_in_one_batch(processor, model):
    small, large = random_images(1, 32, 32)[0], random_images(1, 48, 64, seed=1)[0]
    inputs = encode(processor, [f"a {IMAGE}", f"b {IMAGE}"], [small, large], padding=True, padding_side="left")
    with torch.no_grad():
        x0 = predict_every_image(model, inputs, [small, large], timesteps=torch.tensor([0.3, 0.6])).x0
        logits = model(**inputs, pixel_values=[small, large]).logits
    assert [tuple(x.shape) for x in x0] == [(3, 32, 32), (3, 48, 64)]
    assert torch.isfinite(logits).all()


def test_labels_give_next_token_loss(processor, model):
    images = random_images(1)
    inputs = encode(processor, f"{IMAGE} a red circle", images)
    labels = inputs.input_ids.masked_fill(inputs.input_ids == model.config.image_token_id, -100)
    out = model(**inputs, pixel_values=images, labels=labels)
    logits = out.logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(processor, model, tokenizer):
    images = random_images(2)
    one_span = encode(processor, f"x {IMAGE}", images[:1])
    with pytest.raises(ValueError, match="1 image spans but 2 images"):
        model(**one_span, pixel_values=images)
    wrong_length = encode(processor, f"x {IMAGE}", random_images(1, 32, 32))
    with pytest.raises(ValueError, match="span 0 has 5 slots but image 0 needs 7"):
        model(**wrong_length, pixel_values=images[:1])
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(**one_span, pixel_values=torch.zeros(1, 3, 30, 48))
    with pytest.raises(ValueError, match="zero size"):
        model(**one_span, pixel_values=torch.zeros(1, 3, 0, 48))
    with pytest.raises(ValueError, match="3 timesteps for 1 images"):
        model(**one_span, pixel_values=images[:1], timesteps=torch.ones(3))
    with pytest.raises(ValueError, match="2 image roles for 1 images"):
        model(**one_span, pixel_values=images[:1], image_roles=torch.tensor([2, 2]))


def test_config_rejects_bad_values(tokenizer):
    with pytest.raises(ValueError, match="output_layout"):
        tiny_config(tokenizer, output_layout="tiles")
    with pytest.raises(ValueError, match="image_rope_sections"):
        tiny_config(tokenizer, image_rope_sections=[16, 16, 16])


# ---------------------------------------------------------------------------------------------------- 7B preset


@pytest.mark.parametrize("use_mask_token, expected", [(False, 12_664_131_328), (True, 12_664_134_912)])
def test_7b_preset_parameter_count(use_mask_token, expected):
    with torch.device("meta"):
        model = Tuna2ForConditionalGeneration(Tuna2Config.tuna2_7b(use_mask_token=use_mask_token))
    assert sum(p.numel() for p in model.parameters()) == expected
    assert len(model.state_dict()) == 559 + use_mask_token


def test_fresh_model_has_the_official_initialisation(tokenizer):
    model = Tuna2ForConditionalGeneration(tiny_config(tokenizer))
    zero = [block.adaLN_modulation[1] for block in model.flow_head.layers]
    zero += [model.flow_head.final_layer.adaLN_modulation[1], model.flow_head.final_layer.linear]
    for linear in zero:
        assert not linear.weight.any() and not linear.bias.any()
    conv = model.model.patch_embed.patch_embedding
    fan_in, fan_out = conv.weight[0].numel(), conv.weight.shape[0] * conv.weight[0, 0].numel()
    bound = (6 / (fan_in + fan_out)) ** 0.5  # xavier uniform
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound and not conv.bias.any()
    assert 0.015 < model.model.time_embed.mlp[0].weight.std() < 0.025
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    ids = torch.tensor([[model.config.vision_start_token_id] + [model.config.image_token_id] * 5])
    # zero final layer: the first prediction is 0
    assert not predict_every_image(model, {"input_ids": ids}, images).x0.any()
