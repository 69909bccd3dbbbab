"""Training data for Tuna-2: readers for the four official jsonl formats and for Hugging Face datasets, a weighted
mixture of streams, and the collator that turns any mix of tasks into one batch.

Official jsonl formats (one object per line, image paths relative to the stream's image root):

- ``t2i``:  ``{"image": "imgs/a.png", "caption": "..."}``
- ``mmu``:  ``{"image": "imgs/a.png", "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}``
- ``edit``: ``{"raw_image": "imgs/a.png", "out_image": "imgs/b.png", "instruction": "..."}``
- ``text``: ``{"conversations": [...]}``

Hugging Face datasets with ``messages`` (chat messages with image items) and ``images`` columns are read as
understanding (or text-only) samples.
"""

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch

from transformers_tuna2 import Tuna2ImageRole
from transformers_tuna2.image_utils import stack_if_same_size
from transformers_tuna2.processing_tuna2 import Tuna2Processor

logger = logging.getLogger(__name__)

TASKS = ("t2i", "mmu", "edit", "text")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_KEYS = {"t2i": ("image",), "mmu": ("image",), "edit": ("raw_image", "out_image"), "text": ()}
TEXT_KEYS = {"t2i": "caption", "mmu": "conversations", "edit": "instruction", "text": "conversations"}


class Tuna2DataError(ValueError):
    """A training sample that cannot be used, with where it comes from."""


@dataclass
class Tuna2Sample:
    """One training sample. `images` are file paths or PIL images, in the order the task uses them (edit: source
    then target); `messages` is the chat of understanding and text-only samples."""

    task: str
    origin: str
    text: str | None = None
    messages: list[dict] | None = None
    images: list = field(default_factory=list)

    def load_images(self) -> list[PIL.Image.Image]:
        loaded = []
        for image in self.images:
            if isinstance(image, PIL.Image.Image):
                loaded.append(image)
                continue
            try:
                with PIL.Image.open(image) as opened:
                    opened.load()
                    loaded.append(opened.copy())
            except (OSError, PIL.Image.DecompressionBombError) as error:
                raise Tuna2DataError(f"{self.origin}: cannot decode image {image}: {error}") from error
        return loaded


def conversation_to_messages(conversations, origin: str, with_image: bool) -> list[dict]:
    """Official `conversations` -> chat messages; the image, if any, opens the first user turn (the evaluation
    format) and `<image>` markers in the text are dropped."""
    if not isinstance(conversations, list) or not conversations:
        raise Tuna2DataError(f"{origin}: 'conversations' must be a non-empty list")
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise Tuna2DataError(f"{origin}: each turn needs 'from' (one of {sorted(ROLES)}) and a string 'value'")
        messages.append({"role": ROLES[turn["from"]], "content": turn["value"].replace("<image>", "").strip()})
    if not any(message["role"] == "assistant" for message in messages):
        raise Tuna2DataError(f"{origin}: the conversation has no assistant turn")
    if with_image:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise Tuna2DataError(f"{origin}: the conversation has no user turn to hold the image")
        first_user["content"] = [{"type": "image"}, {"type": "text", "text": first_user["content"]}]
    return messages


def parse_record(record, task: str, origin: str, image_root: Path) -> Tuna2Sample:
    if not isinstance(record, dict):
        raise Tuna2DataError(f"{origin}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in (*IMAGE_KEYS[task], TEXT_KEYS[task]) if key not in record]
    if missing:
        raise Tuna2DataError(f"{origin}: missing {', '.join(repr(key) for key in missing)} for a {task} sample")
    images = []
    for key in IMAGE_KEYS[task]:
        path = image_root / record[key]
        if not path.is_file():
            raise Tuna2DataError(f"{origin}: image file not found: {path}")
        images.append(path)
    if task in ("mmu", "text"):
        messages = conversation_to_messages(record["conversations"], origin, with_image=task == "mmu")
        return Tuna2Sample(task=task, origin=origin, messages=messages, images=images)
    if not isinstance(record[TEXT_KEYS[task]], str):
        raise Tuna2DataError(f"{origin}: {TEXT_KEYS[task]!r} must be a string")
    return Tuna2Sample(task=task, origin=origin, text=record[TEXT_KEYS[task]], images=images)


def read_jsonl(path, task: str, image_root=None, skip_bad_samples: bool = False) -> list[Tuna2Sample]:
    """Reads one official jsonl stream. A bad line raises a [`Tuna2DataError`] naming the file and line, or is
    skipped with a warning when `skip_bad_samples`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    path = Path(path)
    image_root = Path(image_root) if image_root is not None else path.parent
    samples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            origin = f"{path}:{number}"
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise Tuna2DataError(f"{origin}: malformed JSON: {error}") from error
                samples.append(parse_record(record, task, origin, image_root))
            except Tuna2DataError as error:
                if not skip_bad_samples:
                    raise
                logger.warning("skipping a bad sample: %s", error)
    if not samples:
        raise Tuna2DataError(f"{path}: no usable {task} samples")
    return samples


def read_hf_dataset(dataset, name: str = "dataset", skip_bad_samples: bool = False) -> list[Tuna2Sample]:
    """Samples from a Hugging Face dataset with `messages` and `images` columns (understanding, or text-only when
    a row has no images)."""
    samples = []
    for index, row in enumerate(dataset):
        origin = f"{name}[{index}]"
        try:
            messages, images = row.get("messages"), list(row.get("images") or [])
            if not isinstance(messages, list) or not messages:
                raise Tuna2DataError(f"{origin}: 'messages' must be a non-empty list")
            if not any(message.get("role") == "assistant" for message in messages):
                raise Tuna2DataError(f"{origin}: the conversation has no assistant turn")
            slots = sum(
                1
                for message in messages
                if isinstance(message.get("content"), list)
                for item in message["content"]
                if item.get("type") == "image"
            )
            if slots != len(images):
                raise Tuna2DataError(f"{origin}: {slots} image items in 'messages' but {len(images)} images")
            samples.append(
                Tuna2Sample(task="mmu" if images else "text", origin=origin, messages=messages, images=images)
            )
        except Tuna2DataError as error:
            if not skip_bad_samples:
                raise
            logger.warning("skipping a bad sample: %s", error)
    return samples


def task_schedule(names: list[str], weights: list[float], num_blocks: int) -> list[str]:
    """Which stream each of `num_blocks` blocks comes from: smooth weighted round-robin, so that any run of blocks
    follows the weights as closely as whole blocks allow (weights 1:1:1 give t2i, mmu, edit, t2i, mmu, edit, ...)."""
    total = sum(weights)
    credit = [0.0] * len(names)
    schedule = []
    for _ in range(num_blocks):
        credit = [c + w for c, w in zip(credit, weights)]
        chosen = max(range(len(names)), key=lambda k: credit[k])
        credit[chosen] -= total
        schedule.append(names[chosen])
    return schedule


class Tuna2MixtureDataset(torch.utils.data.Dataset):
    """Draws samples from several streams with per-stream weights (item i is reproducible from `seed` and i).

    By default every item draws its stream with the weights, so a batch mixes tasks and is padded to its longest
    row (understanding rows are often several times longer than generation rows). With `task_batch_size`, items
    come in blocks of that many from one stream: read in order (`train_sampling_strategy="sequential"`) with that
    batch size, each micro-batch holds one task and little padding, and consecutive micro-batches take turns between
    the streams in proportion to the weights, so that gradient accumulation over them makes joint updates. Each
    stream is then read as a shuffled pass without replacement (every sample once per pass).

    A sample whose image cannot be decoded raises a [`Tuna2DataError`] naming its file and line, or, with
    `skip_bad_samples`, is replaced by another draw after a warning.
    """

    def __init__(
        self,
        streams: dict[str, list[Tuna2Sample]],
        weights: dict[str, float] | None = None,
        length: int | None = None,
        seed: int = 0,
        skip_bad_samples: bool = False,
        task_batch_size: int | None = None,
    ):
        self.names = [name for name, samples in streams.items() if samples]
        if not self.names:
            raise ValueError("no training samples in any stream")
        self.streams = streams
        weights = weights or {}
        self.weights = [float(weights.get(name, 1.0)) for name in self.names]
        if any(weight < 0 for weight in self.weights) or sum(self.weights) <= 0:
            raise ValueError(
                f"stream weights must be >= 0 with a positive sum, got {dict(zip(self.names, self.weights))}"
            )
        if task_batch_size is not None and task_batch_size < 1:
            raise ValueError(f"task_batch_size must be >= 1, got {task_batch_size}")
        self.length = length or sum(len(streams[name]) for name in self.names)
        self.seed = seed
        self.skip_bad_samples = skip_bad_samples
        self.task_batch_size = task_batch_size
        if task_batch_size is not None:
            num_blocks = -(-self.length // task_batch_size)
            self.block_tasks = task_schedule(self.names, self.weights, num_blocks)
            seen = dict.fromkeys(self.names, 0)
            self.block_ordinals = []  # how many earlier blocks came from the same stream
            for task in self.block_tasks:
                self.block_ordinals.append(seen[task])
                seen[task] += 1
            self._passes = {}  # stream name -> (pass number, shuffled order): the pass being read

    def __len__(self) -> int:
        return self.length

    def stream_pass(self, name: str, number: int) -> list[int]:
        """The shuffled order of pass `number` over stream `name`."""
        if self._passes.get(name, (None,))[0] != number:
            order = list(range(len(self.streams[name])))
            random.Random(f"{self.seed}/{name}/{number}").shuffle(order)
            self._passes[name] = (number, order)
        return self._passes[name][1]

    def draws(self, index: int):
        """The samples item `index` tries in turn (the first that loads is the item)."""
        if self.task_batch_size is None:
            rng = random.Random(self.seed * 1_000_003 + index)
            while True:
                name = rng.choices(self.names, weights=self.weights)[0]
                yield self.streams[name][rng.randrange(len(self.streams[name]))]
        block, offset = divmod(index, self.task_batch_size)
        name, size = self.block_tasks[block], len(self.streams[self.block_tasks[block]])
        position = self.block_ordinals[block] * self.task_batch_size + offset
        while True:
            yield self.streams[name][self.stream_pass(name, position // size)[position % size]]
            position += 1  # a bad sample: the next one of the same stream

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        for _, sample in zip(range(100), self.draws(index)):
            try:
                return {"sample": sample, "images": sample.load_images()}
            except Tuna2DataError as error:
                if not self.skip_bad_samples:
                    raise
                logger.warning("skipping a bad sample: %s", error)
        raise Tuna2DataError("100 draws in a row failed to load; check the data")

    def to_hf_dataset(self):
        """The same items as a `datasets.Dataset` (what TRL's trainers take), loaded lazily on access."""
        import datasets

        dataset = datasets.Dataset.from_dict({"index": list(range(len(self)))})

        def load(batch):
            items = [self[index] for index in batch["index"]]
            return {"sample": [item["sample"] for item in items], "images": [item["images"] for item in items]}

        dataset.set_transform(load)
        return dataset


class Tuna2Collator:
    """Builds one batch from any mix of t2i, edit, understanding and text-only samples.

    Sequence layouts come from the processor: generation samples use the official generation layout (the image span
    holds a time slot and all N patches, labels all ignored), understanding and text-only samples use the chat
    template with labels on assistant turns only (text-only samples get no image span). Image roles tell the model
    which images to noise and supervise. Target images go to `image_size`, else to the processor's fixed size if it
    has one, else to their resolution bucket, resized to cover it and center-cropped (never padded); edit sources are
    brought to their target's size.

    Args:
        processor ([`Tuna2Processor`]): tokenizer + image processor.
        image_size (`int` or `(height, width)`, *optional*): a fixed size for generated images; defaults to the
            processor's fixed size, else buckets.
        resolution (`str`, defaults to `"512"`): bucket class for generated images.
        caption_dropout (`float`, defaults to 0.0): probability of replacing a caption or edit instruction with the
            empty prompt, so that the model learns the unconditional branch of classifier-free guidance (the official
            training has none).
        seed (`int`, defaults to 0): seeds the caption dropout.
    """

    def __init__(
        self,
        processor: Tuna2Processor,
        image_size=None,
        resolution: str = "512",
        caption_dropout: float = 0.0,
        seed: int = 0,
    ):
        self.processor = processor
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.resolution = resolution
        self.caption_dropout = caption_dropout
        self.rng = random.Random(seed)

    def target_size(self, image: PIL.Image.Image) -> tuple[int, int]:
        """`image_size`, else the processor's fixed size (a checkpoint trained at one size), else the bucket."""
        if self.image_size is not None:
            return tuple(self.image_size)
        image_processor = self.processor.image_processor
        return image_processor.target_size(image.height, image.width, self.resolution, image_processor.size)

    def encode_generation(self, sample: Tuna2Sample, images: list[PIL.Image.Image]) -> dict:
        target = images[-1]
        height, width = self.target_size(target)
        sources = images[:-1] or None
        text = "" if self.rng.random() < self.caption_dropout else sample.text
        inputs = self.processor.generation_inputs([text], height, width, source_images=sources)
        input_ids = torch.cat([inputs["input_ids"][0], inputs["span_ids"][0], inputs["suffix_ids"][0]]).tolist()
        target_pixels = self.processor.image_processor(
            target, size={"height": height, "width": width}, resize_mode="center_crop"
        )["pixel_values"]
        pixels = list(inputs["pixel_values"]) if sources else []
        roles = [Tuna2ImageRole.CONDITION] * len(pixels) + [Tuna2ImageRole.TARGET]
        return {
            "input_ids": input_ids,
            "labels": [-100] * len(input_ids),
            "pixel_values": pixels + [target_pixels[0]],
            "image_roles": roles,
        }

    def encode_conversation(self, sample: Tuna2Sample, images: list[PIL.Image.Image]) -> dict:
        encoded = self.processor.conversation_inputs(sample.messages, images)
        pixels = list(encoded["pixel_values"]) if encoded["pixel_values"] is not None else []
        return {**encoded, "pixel_values": pixels, "image_roles": [Tuna2ImageRole.UNDERSTANDING] * len(pixels)}

    def __call__(self, features: list[dict]) -> dict:
        encoded = []
        for feature in features:
            sample, images = feature["sample"], feature["images"]
            try:
                if sample.task in ("t2i", "edit"):
                    encoded.append(self.encode_generation(sample, images))
                else:
                    encoded.append(self.encode_conversation(sample, images))
            except ValueError as error:
                raise Tuna2DataError(f"{sample.origin}: {error}") from error
        length = max(len(item["input_ids"]) for item in encoded)
        pad_id = self.processor.tokenizer.pad_token_id
        batch = {
            "input_ids": torch.tensor([e["input_ids"] + [pad_id] * (length - len(e["input_ids"])) for e in encoded]),
            "attention_mask": torch.tensor(
                [[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"])) for e in encoded]
            ),
            "labels": torch.tensor([e["labels"] + [-100] * (length - len(e["labels"])) for e in encoded]),
        }
        pixels = [pixel for item in encoded for pixel in item["pixel_values"]]
        if pixels:
            batch["pixel_values"] = stack_if_same_size(pixels)
            batch["image_roles"] = torch.tensor([int(role) for item in encoded for role in item["image_roles"]])
        return batch


__all__ = [
    "Tuna2Collator",
    "Tuna2DataError",
    "Tuna2MixtureDataset",
    "Tuna2Sample",
    "read_hf_dataset",
    "read_jsonl",
]
