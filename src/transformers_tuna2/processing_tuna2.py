"""Tuna-2 processor: the Qwen2 tokenizer and the image processor. It owns the sequence layout: each image becomes
`<|vision_start|>` + one `<|image_pad|>` per span slot (1 time slot + one per patch) + `<|vision_end|>`."""

import copy

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import PreTokenizedInput, TextInput
from transformers.utils import logging

from .configuration_tuna2 import Tuna2ImageRole
from .image_processing_tuna2 import Tuna2ImageProcessorKwargs, flatten_images

logger = logging.get_logger(__name__)
DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5's template with image content items. Content items are joined with a newline, so that an image followed
# by a question renders exactly as the official evaluation prompt "<image>\n{question}".
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{ '<|im_start|>system\\n' + render(messages[0]['content']) + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (message['role'] == 'system' and loop.first) -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + render(message['content']) + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def span_slots(height: int, width: int, patch_size: int) -> int:
    """Slots of an image span: one time slot plus one per patch."""
    return 1 + (height // patch_size) * (width // patch_size)


def generation_length(num_span_slots: int, editing: bool, prompt_length: int = 0) -> int:
    """Positions of a generation sequence ([`Tuna2Processor.generation_inputs`]) around a prompt of
    `prompt_length` tokens: the generated span and 4 special tokens; editing adds the source's span and 2 more."""
    return prompt_length + (2 * num_span_slots + 6 if editing else num_span_slots + 4)


def official_text_budget(num_span_slots: int, editing: bool) -> int | None:
    """Token budget of a generation prompt in the official pipelines (which pad to fixed lengths): text-to-image uses
    2048 or 5120 positions, whichever is closer to `h*w + 1024`; editing uses 4096; both minus the
    [`generation_length`] of an empty prompt. None where that budget is not positive (no truncation)."""
    if editing:
        max_seq_len = 4096
    else:
        patches = num_span_slots - 1
        max_seq_len = 2048 if abs(patches + 1024 - 2048) < abs(patches + 1024 - 5120) else 5120
    budget = max_seq_len - generation_length(num_span_slots, editing)
    return budget if budget > 0 else None


class Tuna2ProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: Tuna2ImageProcessorKwargs
    # Generation appends to the right end of every row, so a batch of prompts is padded on the left, as in
    # transformers' VLM processors; a tokenizer created with an explicit `padding_side` overrides it.
    _defaults = {"text_kwargs": {"padding": False, "add_special_tokens": False, "padding_side": "left"}}


class Tuna2Processor(ProcessorMixin):
    r"""
    Wraps a Qwen2 tokenizer and a [`Tuna2ImageProcessor`].

    In `text`, each `<|image_pad|>` stands for one image (the chat template writes
    `<|vision_start|><|image_pad|><|vision_end|>` for an image content item); the processor expands it to
    `1 + num_patches` copies, the image's span.

    Args:
        image_processor ([`Tuna2ImageProcessor`]): the image processor.
        tokenizer ([`Qwen2TokenizerFast`]): the tokenizer, with the Qwen special tokens; left as it is. The processor
            pads on the left unless the tokenizer was created with another `padding_side`.
        chat_template (`str`, *optional*): defaults to the Qwen2.5 template with image items.
    """

    valid_processor_kwargs = Tuna2ProcessorKwargs
    image_token = "<|image_pad|>"
    vision_start_token = "<|vision_start|>"
    vision_end_token = "<|vision_end|>"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)

    def num_span_slots(self, height: int, width: int) -> int:
        """Slots of an image span: one time slot plus one per patch ([`span_slots`])."""
        return span_slots(height, width, self.image_processor.patch_size)

    def expand_image_tokens(self, texts: list[str], pixel_values) -> list[str]:
        """Replaces the i-th `<|image_pad|>` of the batch with the span of the i-th image."""
        counts = [text.count(self.image_token) for text in texts]
        num_images = 0 if pixel_values is None else len(pixel_values)
        if sum(counts) != num_images:
            raise ValueError(
                f"the text holds {sum(counts)} image placeholders ({self.image_token}) "
                f"but {num_images} images were given"
            )
        expanded, image_iter = [], iter(range(num_images))
        for text in texts:
            pieces = text.split(self.image_token)
            out = pieces[0]
            for piece in pieces[1:]:
                height, width = pixel_values[next(image_iter)].shape[-2:]
                out += self.image_token * self.num_span_slots(height, width) + piece
            expanded.append(out)
        return expanded

    def generation_inputs(
        self,
        prompts: list[str],
        height: int,
        width: int,
        source_images: list | None = None,
        return_tensors: str = "pt",
        max_length: int | None = None,
    ) -> BatchFeature:
        """
        The official generation layout (no chat template), one image to generate per prompt, split where the
        generated image starts so that the prefix can be cached:

        - text-to-image: `<|im_start|> prompt <|vision_start|>` + span + `<|vision_end|><|im_end|>`;
        - editing: `<|im_start|><|vision_start|>` source span `<|vision_end|> instruction <|vision_start|>` + span +
          `<|vision_end|><|im_end|>`, the source resized to cover `height x width` and center-cropped.

        Prompts are tokenized without special tokens and cut to the official budget ([`official_text_budget`]), or
        to what fits in `max_length` positions (the model's `max_position_embeddings`) when that is less.

        Returns:
            [`BatchFeature`] with `input_ids` and `attention_mask` of the left-padded prefixes, `span_ids`
            `(batch_size, 1 + num_patches)` (the generated image's span), `suffix_ids` `(batch_size, 2)`,
            `image_roles` of the images of the whole sequences, sample-major (`CONDITION` for a source, `TARGET` for
            the generated image) and, for editing, the sources' `pixel_values`.
        """
        num_slots = self.num_span_slots(height, width)
        editing = source_images is not None
        budget = official_text_budget(num_slots, editing)
        reason = "as the official pipeline does"
        if max_length is not None:
            needed = generation_length(num_slots, editing)
            room = max_length - needed
            if room < 0:
                raise ValueError(
                    f"a {height}x{width} image needs {needed} positions, past the {max_length} the model takes"
                )
            if budget is None or room < budget:
                budget = room
                reason = f"to fit the model's {max_length} positions with the {height}x{width} image"
        text_ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        if budget is not None and any(len(ids) > budget for ids in text_ids):
            longest = max(range(len(text_ids)), key=lambda i: len(text_ids[i]))
            logger.warning(
                f"prompts longer than {budget} tokens are truncated, {reason} (the longest, {prompts[longest][:40]!r}"
                f"..., has {len(text_ids[longest])})"
            )
            text_ids = [ids[:budget] for ids in text_ids]
        start, end = self.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        boi, eoi = self.vision_start_token_id, self.vision_end_token_id
        data = {}
        if source_images is None:
            prefixes = [[start, *ids, boi] for ids in text_ids]
        else:
            pixel_values = self.image_processor(
                source_images, size={"height": height, "width": width}, resize_mode="center_crop"
            )["pixel_values"]
            if len(pixel_values) != len(prompts):
                raise ValueError(f"got {len(pixel_values)} source images for {len(prompts)} instructions")
            data["pixel_values"] = pixel_values
            source_span = [self.image_token_id] * num_slots
            prefixes = [[start, boi, *source_span, eoi, *ids, boi] for ids in text_ids]
        roles = [Tuna2ImageRole.TARGET] if source_images is None else [Tuna2ImageRole.CONDITION, Tuna2ImageRole.TARGET]
        data["image_roles"] = torch.tensor(roles * len(prompts))
        padded = self.tokenizer.pad({"input_ids": prefixes}, padding=True, padding_side="left", return_tensors="pt")
        data["input_ids"], data["attention_mask"] = padded["input_ids"], padded["attention_mask"]
        data["span_ids"] = torch.full((len(prompts), num_slots), self.image_token_id)
        data["suffix_ids"] = torch.tensor([[eoi, end]] * len(prompts))
        return BatchFeature(data, skip_tensor_conversion=["pixel_values"])

    def conversation_inputs(self, messages: list[dict], images: list | None = None) -> dict:
        """
        A chat for training on understanding, in the evaluation format (the chat template, images inside their user
        turns), with labels on the assistant turns only: each assistant message's content and its `<|im_end|>`.

        Args:
            messages (`list[dict]`): chat messages (`role`, `content` as a string or a list of items); image items
                are filled from `images` in order.
            images (`list`, *optional*): the images of the image items.

        Returns:
            `dict` with `input_ids` and `labels` (lists of ints, -100 outside assistant turns) and `pixel_values`
            (None without images).
        """
        if not any(message["role"] == "assistant" for message in messages):
            raise ValueError("the conversation has no assistant turn, so there is nothing to learn from it")
        pixel_values = self.image_processor(images)["pixel_values"] if images else None

        def render(upto: int, add_generation_prompt: bool) -> str:
            text = self.apply_chat_template(messages[:upto], add_generation_prompt=add_generation_prompt)
            slots = text.count(self.image_token)
            return self.expand_image_tokens([text], pixel_values[:slots] if slots else None)[0]

        text = render(len(messages), add_generation_prompt=False)
        answer_ranges = []
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(render(index, add_generation_prompt=True))
                end = len(render(index + 1, add_generation_prompt=False)) - len("\n")  # content + <|im_end|>
                answer_ranges.append((start, end))
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [
            token if any(start <= first and last <= end for start, end in answer_ranges) else -100
            for token, (first, last) in zip(encoding["input_ids"], encoding["offset_mapping"])
        ]
        return {"input_ids": encoding["input_ids"], "labels": labels, "pixel_values": pixel_values}

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | PreTokenizedInput | list[TextInput] | list[PreTokenizedInput] | None = None,
        **kwargs: Unpack[Tuna2ProcessorKwargs],
    ) -> BatchFeature:
        """
        Args:
            images: images for the placeholders, in order (one list, or one list per sample); PIL images, arrays,
                tensors, or URLs and file paths.
            text (`str` or `list[str]`): texts with one `<|image_pad|>` per image.
            kwargs: the tokenizer's options and the image processor's (`size`, `resolution`, `resize_mode`).

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask` and, with images, `pixel_values` (see
            [`Tuna2ImageProcessor.preprocess`]).
        """
        # `apply_chat_template` passes `videos=None, audio=None` to every processor.
        for modality in ("videos", "audio"):
            if kwargs.pop(modality, None) is not None:
                raise ValueError(f"Tuna2Processor does not take `{modality}`: Tuna-2 takes images and text only")
        if text is None:
            raise ValueError("Tuna2Processor needs text; use the image processor alone for images only")
        texts = [text] if isinstance(text, str) else list(text)
        output_kwargs = self._merge_kwargs(
            Tuna2ProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        return_tensors = output_kwargs["text_kwargs"].pop("return_tensors", None)
        output_kwargs["images_kwargs"].pop("return_tensors", None)

        pixel_values = None
        if images is not None and flatten_images(images):
            pixel_values = self.image_processor(images, **output_kwargs["images_kwargs"])["pixel_values"]
        texts = self.expand_image_tokens(texts, pixel_values)
        data = dict(self.tokenizer(texts, return_tensors=return_tensors, **output_kwargs["text_kwargs"]))
        if pixel_values is not None:
            data["pixel_values"] = pixel_values
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["pixel_values"])

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        # transformers writes the `auto_map` of the registered classes into the processor and image processor it
        # saves, and adds then deletes one in the tokenizer's `init_kwargs` (losing one loaded from a checkpoint):
        # saving a copy leaves this processor as it was.
        return super(Tuna2Processor, copy.deepcopy(self)).save_pretrained(save_directory, push_to_hub, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["Tuna2Processor"]
