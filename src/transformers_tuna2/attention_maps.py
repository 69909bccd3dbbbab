"""Attention maps: where the language model looks in each image while it reads a question (or an answer).

Tuna-2 feeds raw 16x16 pixel patches to the language model, with no vision encoder; the paper's attention figure shows
that text tokens attend to the patches they are about. [`attention_maps`] computes such maps on the transformers API,
and [`overlay_attention_map`] draws one over its image.
"""

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch

QUERIES = ("question", "answer", "both")


@dataclass
class Tuna2AttentionMaps:
    """
    Attributes:
        maps (`list[torch.FloatTensor]`):
            One `(h, w)` map per image, at its patch grid: the attention the query tokens pay to each patch (softmax
            weights over the whole sequence, averaged over heads, query tokens and layers; the time slot is left out).
            A map sums to the share of the queries' attention that goes to that image's patches.
        images (`list[PIL.Image.Image]`):
            Each image as the model saw it (resized to its bucket), aligned with its map.
        layers (`list[int]`):
            The language-model layers averaged.
        query_tokens (`list[str]`):
            The query tokens, decoded.
        answer (`str` or None):
            The answer that was read (given or generated), if any.
    """

    maps: list[torch.Tensor]
    images: list[PIL.Image.Image]
    layers: list[int]
    query_tokens: list[str] = field(default_factory=list)
    answer: str | None = None

    def overlays(self, alpha: float = 0.5, smooth: bool = True, scale: int = 1) -> list[PIL.Image.Image]:
        """[`overlay_attention_map`] of each image with its map."""
        return [
            overlay_attention_map(image, attention, alpha=alpha, smooth=smooth, scale=scale)
            for image, attention in zip(self.images, self.maps)
        ]


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map (blue, cyan, yellow, red) of values in [0, 1], as `(..., 3)` floats in [0, 1]."""
    values = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # where red, green and blue peak
    return np.clip(1.5 - np.abs(4.0 * (values - centres)), 0.0, 1.0)


def overlay_attention_map(
    image: PIL.Image.Image,
    attention_map: torch.Tensor | np.ndarray,
    alpha: float = 0.5,
    smooth: bool = True,
    scale: int = 1,
) -> PIL.Image.Image:
    """
    Draws an attention map over an image, as the official visualisation does: the map is min-max normalised to
    [0, 1], upsampled to the image's size and blended with the jet colour map.

    Args:
        image (`PIL.Image.Image`): the image the map belongs to (its grid covers the whole image).
        attention_map (`torch.Tensor` or `np.ndarray` of shape `(h, w)`): the patch map.
        alpha (`float`, defaults to 0.5): opacity of the heat map.
        smooth (`bool`, defaults to True): bilinear upsampling (official); False shows each patch as one block.
        scale (`int`, defaults to 1): enlarges the result by this factor (nearest neighbour for the image), for small
            images.

    Returns:
        `PIL.Image.Image`: an RGB image of the image's size times `scale`.
    """
    if isinstance(attention_map, torch.Tensor):
        attention_map = attention_map.detach().float().cpu().numpy()
    attention_map = np.asarray(attention_map, dtype=np.float64)
    if attention_map.ndim != 2:
        raise ValueError(f"an attention map is (h, w), got shape {attention_map.shape}")
    low, high = attention_map.min(), attention_map.max()
    normalised = (attention_map - low) / (high - low) if high > low else np.zeros_like(attention_map)
    base = image.convert("RGB")
    if scale != 1:
        base = base.resize((base.width * scale, base.height * scale), PIL.Image.NEAREST)
    heat = PIL.Image.fromarray(normalised.astype(np.float32), mode="F").resize(
        base.size, PIL.Image.BILINEAR if smooth else PIL.Image.NEAREST
    )
    colours = jet(np.asarray(heat))
    blended = (1 - alpha) * (np.asarray(base, dtype=np.float64) / 255.0) + alpha * colours
    return PIL.Image.fromarray(np.round(blended * 255).clip(0, 255).astype(np.uint8))


def resolve_layers(layers, num_layers: int) -> list[int]:
    """Layer indices (negative ones count from the end), sorted and checked; None means all layers."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, int):
        layers = [layers]
    resolved = set()
    for layer in layers:
        index = layer + num_layers if layer < 0 else layer
        if not 0 <= index < num_layers:
            raise ValueError(f"layer {layer} does not exist: the language model has {num_layers} layers")
        resolved.add(index)
    if not resolved:
        raise ValueError("no layers were chosen")
    return sorted(resolved)


def parse_layers(text: str) -> list[int]:
    """Layers written as on a command line: `2`, `0,3`, `4-7` (inclusive) or `-1` (from the end)."""
    layers = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ValueError(f"layers must look like 3, 0,2, 4-7 or -1, got {text!r}")
        first = int(match[1])
        last = int(match[2]) if match[2] is not None else first
        if last < first:
            raise ValueError(f"layer range {part.strip()!r} is empty")
        layers.extend(range(first, last + 1))
    return layers


def text_ranges(part: str, start: int, end: int, target: str | None) -> list[tuple[int, int]]:
    """Character ranges of `part` (placed at `start`..`end` of the prompt) that hold the queries: all of it, or each
    occurrence of `target` in it (case-insensitive)."""
    if target is None:
        return [(start, end)]
    return [(start + m.start(), start + m.end()) for m in re.finditer(re.escape(target), part, re.IGNORECASE)]


def language_model_of(model) -> torch.nn.Module:
    inner = model.model if hasattr(model, "lm_head") else model
    return inner.language_model


class _Stop(Exception):
    """Raised after the last layer needed, to skip the layers above it."""


@contextmanager
def eager_attention(model):
    """Switches the model to eager attention, which returns its weights, and back to what it was."""
    previous = {"": model.config._attn_implementation}
    for name in getattr(model.config, "sub_configs", {}):
        sub_config = getattr(model.config, name, None)
        if sub_config is not None:
            previous[name] = sub_config._attn_implementation
    if all(value == "eager" for value in previous.values()):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def attention_maps(
    model,
    processor,
    images,
    question: str,
    answer: str | bool | None = None,
    layers: int | list[int] | range | None = None,
    query: str = "question",
    target: str | None = None,
    max_new_tokens: int = 32,
    **images_kwargs,
) -> Tuna2AttentionMaps:
    """
    Attention maps of the language model over the patches of each image, for a question in the chat format of
    understanding (`user: <image>... \\n question`, then the assistant's turn).

    The prompt runs once with eager attention (switched on for this call only, then restored); hooks on the chosen
    layers take each layer's softmax weights from the query tokens' rows to each image's patch columns, and the layers
    above the last chosen one are skipped. The weights are averaged over all heads, the query tokens and the chosen
    layers, and each image's patch columns (its time slot left out) are reshaped to its patch grid `(h, w)`.

    How this relates to the official `attention_visualization_simple.py` (facebookresearch/tuna-2): the official
    script runs one forward pass, averages the attention of every layer and every head, takes the row of a single
    query token (the first prompt token whose text contains `--target-word`) and its columns over the image's patches
    (the time slot skipped), reshapes them to the patch grid, min-max normalises and overlays them with the jet colour
    map at alpha 0.5. We average over heads and layers the same way, and the default layers are all of them, as there.
    We differ in:

    - the query tokens: by default all the question's tokens (there is no word to name when asking from a script or
      the command line), or with `target` every token overlapping an occurrence of that word in the question (and
      answer), so that a word split into several tokens is found too (the official test `word in decode(token)` misses
      it) and the system prompt is never searched; `query="answer"` reads the answer's tokens instead;
    - the returned map is the raw mean softmax weight, not min-max normalised, so that maps compare across images and
      prompts and their sums are the attention mass on each image; only the overlay normalises, as the official plot;
    - the prompt is the chat template's (the official script builds the same Qwen chat by hand), at the image's bucket
      size, any number of images;
    - only the chosen layers' weights are kept, reduced at once, so that long sequences need no `(layers, heads, L, L)`
      stack.

    Args:
        model ([`Tuna2ForConditionalGeneration`] or [`Tuna2Model`]): the model.
        processor ([`Tuna2Processor`]): its processor.
        images (`PIL.Image.Image` or a list of them, or anything the processor takes): the images, placed before the
            question in one user turn.
        question (`str`): the question.
        answer (`str` or `bool`, *optional*): an answer to append after the assistant prompt, or True to generate one
            (greedy, up to `max_new_tokens`, with the model's own attention implementation).
        layers (`int`, `list[int]` or `range`, *optional*): the layers to average (negative counts from the end);
            all by default, as the official script.
        query (`str`, defaults to `"question"`): whose rows are read: `"question"`, `"answer"` or `"both"`.
        target (`str`, *optional*): only the tokens of this word (case-insensitive) within those parts.
        max_new_tokens (`int`, defaults to 32): longest generated answer.
        images_kwargs: options of the image processor (`size`, `resolution`, `resize_mode`).

    Returns:
        [`Tuna2AttentionMaps`]: one `(h, w)` map per image, the images as the model saw them, the layers and the query
        tokens.
    """
    if query not in QUERIES:
        raise ValueError(f"query must be one of {', '.join(QUERIES)}, got {query!r}")
    if query != "question" and not answer:
        raise ValueError(f"query={query!r} reads the answer: pass an answer, or answer=True to generate one")
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("attention maps need at least one image")
    language_model = language_model_of(model)
    chosen = resolve_layers(layers, len(language_model.layers))

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    pixel_values = processor.image_processor(images, **images_kwargs)["pixel_values"]
    prompt = processor.expand_image_tokens([prompt], pixel_values)[0]
    end_of_question = prompt.rindex("<|im_end|>")
    question_start = end_of_question - len(question)
    if prompt[question_start:end_of_question] != question:
        raise ValueError("the chat template does not end the user turn with the question")
    device = next(model.parameters()).device

    if answer is True:
        inputs = processor.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)
        output = model.generate(**inputs, pixel_values=pixel_values, max_new_tokens=max_new_tokens, do_sample=False)
        answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answer = answer.strip()
        if not answer:
            raise ValueError("the model generated an empty answer; pass one as `answer`")
    text = prompt + (answer or "")

    ranges = []
    if query in ("question", "both"):
        ranges += text_ranges(question, question_start, end_of_question, target)
    if query in ("answer", "both"):
        ranges += text_ranges(answer, len(prompt), len(text), target)
    encoding = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    rows = [
        index
        for index, (first, last) in enumerate(encoding["offset_mapping"])
        if last > first and any(first < end and start < last for start, end in ranges)
    ]
    if not rows:
        where = f"the word {target!r}" if target is not None else "text"
        raise ValueError(f"the {query} holds no tokens of {where}")

    # Patch columns of each image: its span's positions after the time slot.
    image_token_id = processor.image_token_id
    columns, grids, position = [], [], 0
    patch_size = processor.image_processor.patch_size
    for image in pixel_values:
        while input_ids[position] != image_token_id:
            position += 1
        grid = (image.shape[-2] // patch_size, image.shape[-1] // patch_size)
        columns.append(torch.arange(position + 1, position + 1 + grid[0] * grid[1]))
        grids.append(grid)
        position += 1 + grid[0] * grid[1]
    all_columns = torch.cat(columns).to(device)
    row_index = torch.tensor(rows, device=device)

    sums = []

    def keep(module, args, output):
        weights = output[1]  # (1, heads, L, L) with eager attention
        sums.append(weights[0][:, row_index][:, :, all_columns].float().mean(dim=(0, 1)))
        if module.layer_idx == chosen[-1]:
            raise _Stop

    handles = [language_model.layers[index].self_attn.register_forward_hook(keep) for index in chosen]
    try:
        with eager_attention(model):
            inputs = {"input_ids": torch.tensor([input_ids], device=device), "pixel_values": pixel_values}
            try:
                (model.model if hasattr(model, "lm_head") else model)(**inputs, use_cache=False)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if len(sums) != len(chosen):
        raise RuntimeError(f"got the attention of {len(sums)} layers for {len(chosen)} chosen")

    mean = torch.stack(sums).mean(0).cpu()
    maps = [part.reshape(grid) for part, grid in zip(mean.split([len(c) for c in columns]), grids)]
    seen = [
        PIL.Image.fromarray(((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
        for image in pixel_values
    ]
    query_tokens = [processor.tokenizer.decode([input_ids[index]]) for index in rows]
    return Tuna2AttentionMaps(maps=maps, images=seen, layers=chosen, query_tokens=query_tokens, answer=answer or None)


__all__ = ["Tuna2AttentionMaps", "attention_maps", "overlay_attention_map"]
