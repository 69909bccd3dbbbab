"""Converts an official Tuna-2 checkpoint into the folder that `AutoModelForImageTextToText` and `AutoProcessor` load.

    python -m transformers_tuna2.convert_tuna2_weights_to_hf --checkpoint tuna_2_pixel_7b.pt \\
        --tokenizer /models/Qwen2.5-7B-Instruct --output ./tuna2-7b --dtype bfloat16

`tuna2 convert` (and `conversion/convert_tuna2_to_hf.py`) runs this and adds the files of `Tuna2Pipeline`.

Tuna-R, the official encoder variant (`Tuna2RPixel`, "siglip_pixel"), converts the same way; it is recognised by its
SigLIP weights (`vision_model.*`), and needs the SigLIP config it was built from (`--siglip-config`, the
`config.json` of the SigLIP2 checkpoint, e.g. google/siglip2-so400m-patch16-384): the checkpoint's shapes give the
encoder's width, patch size, position-table size (`siglip_image_size`, 512 for the 7B) and kept layers (hence
`vision_feature_layer`), the config its attention heads, activation and norm epsilon.

    python -m transformers_tuna2.convert_tuna2_weights_to_hf --checkpoint tuna_2r_pixel_7b.pt \
        --tokenizer /models/Qwen2.5-7B-Instruct --siglip-config /models/siglip2-so400m-patch16-384 --output ./tuna-r-7b

Input: a `.pt`, `.pth` or `.bin` file (the zip format of `torch.save`) or a `.safetensors` file holding the state dict
of the official `Tuna2Pixel` (or `Tuna2RPixel`), raw or inside a training checkpoint (`model`, `state_dict` or
`module` entries, keys prefixed by `module.`, `_orig_mod.`, `_fsdp_wrapped_module.` or `tuna_model.`). The
configuration is read off the tensor shapes and the Qwen2 config of the base LLM (`config.json` of the `--tokenizer`
folder, or `--base-config`), which holds what shapes cannot tell: the LLM's attention heads, RoPE and norm epsilon.
Every weight of the model must be present with its expected shape; otherwise the conversion fails with the complete
list of missing, unexpected and mis-shaped keys (the official loaders skip such keys silently).

Output: the config (`output_layout="raster"`, the official un-patchify), the weights as safetensors shards with their
index, the tokenizer set up as officially ([PAD], <image>, <|vid_start|>, <|vid_end|> added), the processor, a
generation config for understanding (greedy, at most 512 new tokens, stops at <|im_end|>); `tuna2 convert` adds
`model_index.json` and `scheduler/` for `Tuna2Pipeline` (which loads the folder without them too, with its default
scheduler). The input is read one tensor at a time (a `.pt` file with plain reads at its records' offsets, since the
kernel refuses to map a file larger than the machine's memory copy-on-write, as `torch.load(mmap=True)` does; a
`.safetensors` file through its read-only memory map, opened afresh for each output shard), so that the conversion
holds about one shard in memory, never the whole model.

The learned mask token (masked image modelling, used in training only) is kept when the checkpoint has one, with
`use_mask_token=True`: it is one hidden-size vector, and fine-tuning with the official recipe needs the trained token.
A checkpoint without it gives `use_mask_token=False`.

`--report` prints mean, std and absolute maximum of every weight and flags constant tensors (a norm weight of exactly
1, a zeroed linear) and tensors whose std is far from that of the same weight in the other layers: the official
"foundation" release re-initialised a few layers without saying which. It also lists the layers (LLM decoder layers,
flow-head blocks, the flow head's final layer) that look freshly initialised, every tensor of them as an official
initialisation draws it (`WeightStatistics.fresh_layers`); `--fresh-layers-out FILE` writes their name prefixes, one a
line, for `examples/sft.py --train-only-file FILE`.
"""

import argparse
import io
import json
import math
import pickle
import re
import sys
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from statistics import median

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
    SiglipConfig,
    SiglipVisionConfig,
)
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import logging

from .configuration_tuna2 import Tuna2Config
from .image_processing_tuna2 import Tuna2ImageProcessor
from .modeling_tuna2 import Tuna2ForConditionalGeneration
from .processing_tuna2 import Tuna2Processor

logger = logging.get_logger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# Entries of training checkpoints that hold the state dict (`{"model": ..., "optimizer": ..., "step": ...}`).
WRAPPER_ENTRIES = ("model", "state_dict", "module")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# The official tokenizer setup adds a new special pad token and three normal tokens to Qwen2.5's.
OFFICIAL_PAD_TOKEN = "[PAD]"
OFFICIAL_NEW_TOKENS = ("<image>", "<|vid_start|>", "<|vid_end|>")
# Tokens with a role in Tuna-2's sequences; the processor writes them by name.
ROLE_TOKENS = {
    "bos": "<|im_start|>",
    "eos": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image": "<|image_pad|>",
    "pad": OFFICIAL_PAD_TOKEN,
}
OFFICIAL_MAX_NEW_TOKENS = 512

# The weights the configuration is read from (our names).
EMBEDDINGS = "model.language_model.embed_tokens.weight"
PATCH_CONV = "model.patch_embed.patch_embedding.weight"
TIME_MLP_IN = "model.time_embed.mlp.0.weight"
FLOW_Q_NORM = "flow_head.layers.0.self_attn.q_norm.weight"
FLOW_Q_PROJ = "flow_head.layers.0.self_attn.q_proj.weight"
FLOW_K_PROJ = "flow_head.layers.0.self_attn.k_proj.weight"
FLOW_GATE_PROJ = "flow_head.layers.0.mlp.gate_proj.weight"
MASK_TOKEN = "model.mask_token"
FLOW_LAYER = re.compile(r"^flow_head\.layers\.(\d+)\.")
# Tuna-R's SigLIP tower.
VISION_PATCH_CONV = "model.vision_tower.embeddings.patch_embedding.weight"
VISION_POSITIONS = "model.vision_tower.embeddings.position_embedding.weight"
VISION_LAYER = re.compile(r"^model\.vision_tower\.encoder\.layers\.(\d+)\.")

# A weight whose std is this far (either way) from the median std of the same weight across layers is flagged.
STD_OUTLIER_FACTOR = 2.0

# The units a re-initialisation replaces: LLM decoder layers, flow-head blocks and the flow head's final layer.
LAYER_PREFIX = re.compile(r"^(model\.language_model\.layers\.\d+\.|flow_head\.layers\.\d+\.|flow_head\.final_layer\.)")
# A random tensor matches an initialisation when its std is within FRESH_SIGMAS standard errors (plus FRESH_SLACK, for
# bf16 rounding) of the initialisation's std, its mean within FRESH_SIGMAS standard errors of 0, and its range fits.
FRESH_SIGMAS = 5.0
FRESH_SLACK = 0.01


# ----------------------------------------------------------------------------------------------------------------
# Names of the official (`Tuna2Pixel`) state-dict keys in `Tuna2ForConditionalGeneration`
# ----------------------------------------------------------------------------------------------------------------

# (official prefix, our prefix), tried in order; the official `tuna.*` subtree is a stock Qwen2ForCausalLM.
OFFICIAL_PREFIXES = (
    ("tuna.model.", "model.language_model."),
    ("tuna.lm_head.", "lm_head."),
    ("vision_encoder.", "model.patch_embed."),
    # Tuna-R: the SigLIP tower (no head, no post_layernorm) and `siglip_proj` (RMSNorm, Linear, GELU, Linear).
    ("vision_model.", "model.vision_tower."),
    ("siglip_proj.0.", "model.multi_modal_projector.norm."),
    ("siglip_proj.1.", "model.multi_modal_projector.linear_1."),
    ("siglip_proj.3.", "model.multi_modal_projector.linear_2."),
    ("time_embed.", "model.time_embed."),
    ("diffusion_head_a.", "flow_head.layers."),
    ("diffusion_head_b.", "flow_head.final_layer."),
    ("mask_token", "model.mask_token"),
)

# Wrappers that training and distributed checkpoints put in front of the keys.
WRAPPER_PREFIXES = re.compile(r"^(?:module\.|_orig_mod\.|_fsdp_wrapped_module\.|tuna_model\.)+")


def official_to_hf_key(key: str) -> str | None:
    """Our name for an official key (wrapper prefixes removed), or None when the key has no counterpart."""
    key = WRAPPER_PREFIXES.sub("", key)
    for official, ours in OFFICIAL_PREFIXES:
        if key.startswith(official):
            return ours + key[len(official) :]
    return None


def hf_to_official_key(key: str) -> str:
    """The official name of one of our keys (the inverse of `official_to_hf_key`)."""
    for official, ours in OFFICIAL_PREFIXES:
        if key.startswith(ours):
            return official + key[len(ours) :]
    raise KeyError(f"{key!r} has no counterpart in the official Tuna-2 state dict")


# ----------------------------------------------------------------------------------------------------------------
# Reading the official checkpoint
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor of a `torch.save` file lies: its storage record, and its view of that storage (in elements)."""

    record: str
    dtype: torch.dtype
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


# The globals a checkpoint of tensors and containers may name (what `torch.load(weights_only=True)` allows of them).
STORAGE_DTYPES = {
    f"{name}Storage": dtype
    for name, dtype in {
        "BFloat16": torch.bfloat16, "Half": torch.float16, "Float": torch.float32, "Double": torch.float64,
        "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8, "Byte": torch.uint8,
        "Bool": torch.bool,
    }.items()
}  # fmt: skip


def rebuild_stored_tensor(storage, storage_offset, size, stride, *_) -> StoredTensor:
    record, dtype = storage
    return StoredTensor(record, dtype, storage_offset, tuple(size), tuple(stride))


def rebuild_parameter(tensor, *_):
    return tensor


class CheckpointUnpickler(pickle.Unpickler):
    """Reads the `data.pkl` of a `torch.save` file with every tensor as a [`StoredTensor`] (nothing of its data is
    read), and refuses any global that a checkpoint of tensors and containers does not hold."""

    GLOBALS = {
        ("collections", "OrderedDict"): dict,
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_stored_tensor,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
        **{("torch", name): name for name in STORAGE_DTYPES},
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a checkpoint of tensors")
        return self.GLOBALS[(module, name)]

    def persistent_load(self, saved_id):
        kind, storage_type, key, *_ = saved_id
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        dtype = STORAGE_DTYPES[storage_type] if isinstance(storage_type, str) else storage_type
        return key, dtype


class TorchCheckpointFile:
    """A `torch.save` file (zip format) read one tensor at a time, with plain reads at the offsets of its records.

    `torch.load(mmap=True)` maps the whole file copy-on-write, which the kernel refuses for a file larger than the
    machine's memory (the 25 GB bf16 7B checkpoint on a 24 GB machine); reading each tensor into memory of its own
    needs only that tensor's bytes."""

    def __init__(self, path: Path):
        # torch.load reports a text file as a file that "can only be memory-mapped in the new zip format"; say it
        # plainly.
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"{path} is not a checkpoint in torch.save's zip format (it may be a legacy torch.save file, which "
                "cannot be read lazily: load it and torch.save it again)"
            )
        self.path = path
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ValueError(f"{path} is not a PyTorch checkpoint: it holds no single data.pkl")
            self.prefix = pickles[0].removesuffix("data.pkl")
            try:
                self.content = CheckpointUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
            except (pickle.UnpicklingError, ValueError, TypeError, KeyError) as error:
                raise ValueError(f"{path} is not a PyTorch checkpoint of tensors and containers: {error}") from error
            self.records = {}
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"{path}: record {info.filename} is compressed; torch.save never compresses")
                self.records[info.filename] = info.header_offset

    def data_offset(self, file, record: str) -> int:
        """The offset of a record's bytes: after its local header, whose name and extra field lengths vary."""
        header_offset = self.records[f"{self.prefix}data/{record}"]
        file.seek(header_offset + 26)
        name_length, extra_length = (int.from_bytes(file.read(2), "little") for _ in range(2))
        return header_offset + 30 + name_length + extra_length

    def read(self, file, stored: StoredTensor) -> torch.Tensor:
        """The tensor, in memory of its own: the elements its view spans, read from the file."""
        if math.prod(stored.shape) == 0:
            return torch.empty(stored.shape, dtype=stored.dtype)
        span = 1 + sum((size - 1) * stride for size, stride in zip(stored.shape, stored.stride))
        values = torch.empty(span, dtype=stored.dtype)
        file.seek(self.data_offset(file, stored.record) + stored.storage_offset * values.element_size())
        if file.readinto(values.view(torch.uint8).numpy()) != values.numel() * values.element_size():
            raise ValueError(f"{self.path} is truncated: record {stored.record} ends early")
        return values.as_strided(stored.shape, stored.stride)


def unwrap_state_dict(content, path: Path) -> dict[str, StoredTensor]:
    """The state dict inside a checkpoint's content, descending through `model`, `state_dict` and `module` entries."""
    while isinstance(content, dict):
        wrapper = next((entry for entry in WRAPPER_ENTRIES if isinstance(content.get(entry), dict)), None)
        if wrapper is None:
            break
        content = content[wrapper]
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a {type(content).__name__}, not a state dict")
    if not content:
        raise ValueError(f"{path} holds an empty state dict")
    not_tensors = [str(key) for key, value in content.items() if not isinstance(value, StoredTensor)]
    if not_tensors:
        raise ValueError(f"{path} is not a state dict of tensors; entries that are not tensors: {not_tensors}")
    return content


def map_official_keys(file_keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Returns `{our key: file key}` and the file keys that have no counterpart in our model."""
    mapped, unmapped = {}, []
    for file_key in file_keys:
        key = official_to_hf_key(file_key)
        if key is None:
            unmapped.append(file_key)
        elif key in mapped:
            raise ValueError(f"{file_key!r} and {mapped[key]!r} are the same weight once wrapper prefixes are removed")
        else:
            mapped[key] = file_key
    return mapped, unmapped


class OfficialCheckpoint:
    """An official Tuna-2 checkpoint file, addressed by our key names; tensors are read lazily, one at a time (from a
    read-only memory map for safetensors)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
            raise ValueError(
                f"{self.path}: unsupported file type {self.path.suffix!r}; expected one of "
                f"{(*TORCH_SUFFIXES, SAFETENSORS_SUFFIX)}"
            )
        if not self.path.is_file():
            raise FileNotFoundError(f"no checkpoint file at {self.path}")
        with self._open_file() as (infos, _):
            self.file_keys, self.unmapped_keys = map_official_keys(infos)
            self.infos = {key: infos[file_key] for key, file_key in self.file_keys.items()}

    @contextmanager
    def _open_file(self) -> Iterator[tuple[dict[str, TensorInfo], Callable[[str], torch.Tensor]]]:
        """Maps the file; yields the shape and dtype of each file key, and a function reading a file key's tensor."""
        if self.path.suffix == SAFETENSORS_SUFFIX:
            try:
                handle = safe_open(self.path, framework="pt")
            except SafetensorError as error:
                raise ValueError(f"{self.path} is not a safetensors file: {error}") from error
            with handle:
                infos = {}
                for key in handle.keys():
                    tensor_slice = handle.get_slice(key)
                    dtype = tensor_slice.get_dtype()
                    if dtype not in SAFETENSORS_DTYPES:
                        raise ValueError(f"{self.path}: {key} has dtype {dtype}; Tuna-2 weights are floating point")
                    infos[key] = TensorInfo(tuple(tensor_slice.get_shape()), SAFETENSORS_DTYPES[dtype])
                yield infos, handle.get_tensor
        else:
            checkpoint, state_dict = self.torch_file
            with open(self.path, "rb") as file:
                yield (
                    {key: TensorInfo(stored.shape, stored.dtype) for key, stored in state_dict.items()},
                    lambda key: checkpoint.read(file, state_dict[key]),
                )

    @cached_property
    def torch_file(self) -> tuple[TorchCheckpointFile, dict[str, StoredTensor]]:
        """A `torch.save` file and its state dict, parsed once (the tensors are read at each `open`)."""
        checkpoint = TorchCheckpointFile(self.path)
        return checkpoint, unwrap_state_dict(checkpoint.content, self.path)

    @contextmanager
    def open(self) -> Iterator[Callable[[str], torch.Tensor]]:
        """Yields a function returning the tensor of one of our keys; the file stays mapped until the block ends."""
        with self._open_file() as (_, read):
            yield lambda key: read(self.file_keys[key])

    def dominant_dtype(self) -> torch.dtype:
        """The dtype holding most of the parameters."""
        counts = Counter()
        for info in self.infos.values():
            counts[info.dtype] += math.prod(info.shape)
        return counts.most_common(1)[0][0]


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and configuration
# ----------------------------------------------------------------------------------------------------------------


def load_official_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The Qwen2.5 tokenizer of `path` set up as the official code does: `[PAD]` added as a new special token and made
    the pad token, then `<image>`, `<|vid_start|>`, `<|vid_end|>` added as normal tokens (Qwen2.5's 151665 entries
    become 151669). A tokenizer that already has them is left as it is."""
    if not Path(path).is_dir():  # a hub-id error or a download attempt would hide the typo
        raise ValueError(f"no such folder: {path} (the base LLM's tokenizer)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"pad_token": OFFICIAL_PAD_TOKEN})
    tokenizer.add_tokens(list(OFFICIAL_NEW_TOKENS))
    return tokenizer


def role_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The ids of the tokens with a role in Tuna-2's sequences; raises a `ValueError` when one is missing."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in ROLE_TOKENS.values() if token not in vocab]
    if missing:
        raise ValueError(f"the tokenizer lacks {missing}; Tuna-2 needs a Qwen2.5 tokenizer")
    # The official eos is the tokenizer's, and the processor ends turns and generation prompts with <|im_end|>.
    if tokenizer.eos_token != ROLE_TOKENS["eos"]:
        raise ValueError(
            f"the tokenizer's eos token is {tokenizer.eos_token!r}, not {ROLE_TOKENS['eos']!r}: Tuna-2 uses the "
            "tokenizer of Qwen2.5-Instruct"
        )
    return {role: vocab[token] for role, token in ROLE_TOKENS.items()}


def load_text_config(path: str | Path) -> Qwen2Config:
    """The Qwen2 config of the base LLM from a folder or a `config.json` file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no such file or folder: {path} (the base LLM's Qwen2 config)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; give the base LLM's Qwen2 config with --base-config")
    config = AutoConfig.from_pretrained(path)
    if not isinstance(config, Qwen2Config):
        raise ValueError(f"{path} holds a {type(config).__name__}; Tuna-2's LLM is a Qwen2 model")
    if config.tie_word_embeddings:
        raise ValueError(f"{path} ties the input and output embeddings; Tuna-2's LLM (Qwen2.5-7B) has separate ones")
    return config


def tuna2_config(text_config: Qwen2Config, tokenizer: PreTrainedTokenizerBase, **kwargs) -> Tuna2Config:
    """A Tuna-2 configuration around `text_config`, with the token ids of `tokenizer` (already set up as officially);
    `kwargs` set the other fields.

    `text_config.pad_token_id` stays the base LLM's (unset for Qwen2.5): Qwen2 makes it the embedding's `padding_idx`,
    which would freeze the [PAD] row in fine-tuning, whereas the official model trains every row. The tokenizer and the
    generation config carry [PAD]."""
    ids = role_token_ids(tokenizer)
    text_config._name_or_path = ""  # the local folder it was read from means nothing in the output
    text_config.eos_token_id = ids["eos"]
    return Tuna2Config(
        text_config=text_config,
        image_token_id=ids["image"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        **kwargs,
    )


def load_vision_config(path: str | Path) -> SiglipVisionConfig:
    """The SigLIP vision config of a SigLIP (or fixed-resolution SigLIP2) folder or `config.json` file: the vision
    part of a full SigLIP config, or a vision config."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no such file or folder: {path} (the SigLIP config of Tuna-R's vision encoder)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json (the SigLIP config of Tuna-R's vision encoder)")
    config = AutoConfig.from_pretrained(path)
    if isinstance(config, SiglipConfig):
        config = config.vision_config
    if not isinstance(config, SiglipVisionConfig):
        raise ValueError(f"{path} holds a {type(config).__name__}; Tuna-R's vision encoder is a SigLIP vision model")
    config._name_or_path = ""
    return config


def vision_config_from_shapes(shapes: dict[str, tuple[int, ...]], vision_config: SiglipVisionConfig) -> dict:
    """Tuna-R's vision fields: `vision_config` with the width, patch size and position-table size (`image_size`) of
    the checkpoint's SigLIP tower, and the feature layer its number of kept layers gives."""
    width, num_channels, patch_size, _ = shapes[VISION_PATCH_CONV]
    if width != vision_config.hidden_size:
        raise ValueError(
            f"the checkpoint's SigLIP tower has width {width} but the SigLIP config says {vision_config.hidden_size}: "
            "is --siglip-config the config of the SigLIP the checkpoint was built from?"
        )
    grid = math.isqrt(shapes[VISION_POSITIONS][0])
    if grid * grid != shapes[VISION_POSITIONS][0]:
        raise ValueError(f"the SigLIP position table has {shapes[VISION_POSITIONS][0]} rows, not a square grid")
    num_kept = 1 + max((int(m.group(1)) for key in shapes if (m := VISION_LAYER.match(key))), default=-1)
    if not 1 <= num_kept <= vision_config.num_hidden_layers:
        raise ValueError(
            f"the checkpoint's SigLIP tower has {num_kept} layers, the SigLIP config "
            f"{vision_config.num_hidden_layers}: is --siglip-config the config of the SigLIP the checkpoint was built "
            "from?"
        )
    vision_config.patch_size, vision_config.num_channels = patch_size, num_channels
    vision_config.image_size = grid * patch_size  # the official `siglip_image_size` override
    return dict(
        vision_config=vision_config,
        vision_feature_layer=num_kept - vision_config.num_hidden_layers - 1,
        patch_size=patch_size,
        num_channels=num_channels,
    )


def config_from_shapes(
    checkpoint: OfficialCheckpoint, text_config: Qwen2Config, vision_config: SiglipVisionConfig | None = None
) -> dict:
    """The Tuna2Config fields that the tensor shapes determine (the LLM's vocabulary size is set in `text_config`).
    The flow head's attention shape comes from its projections and the per-head query norm. A Tuna-R checkpoint (with
    SigLIP weights) needs the SigLIP config it was built from, `vision_config`."""
    shapes = {key: info.shape for key, info in checkpoint.infos.items()}
    is_tuna_r = VISION_PATCH_CONV in shapes
    if is_tuna_r and vision_config is None:
        raise ValueError(
            f"{checkpoint.path} is a Tuna-R checkpoint (it has SigLIP weights): give the SigLIP config it was built "
            "from with --siglip-config"
        )
    if not is_tuna_r and vision_config is not None:
        raise ValueError(
            f"{checkpoint.path} is a Tuna-2 checkpoint (no SigLIP weights): --siglip-config is for Tuna-R"
        )
    image_embedding = (VISION_PATCH_CONV, VISION_POSITIONS) if is_tuna_r else (PATCH_CONV,)
    needed = (EMBEDDINGS, *image_embedding, TIME_MLP_IN, FLOW_Q_NORM, FLOW_Q_PROJ, FLOW_K_PROJ, FLOW_GATE_PROJ)
    missing = [hf_to_official_key(key) for key in needed if key not in shapes]
    if missing:
        raise ValueError(f"cannot read a Tuna-2 configuration off {checkpoint.path}: it lacks {missing}")
    vocab_rows, hidden_size = shapes[EMBEDDINGS]
    if hidden_size != text_config.hidden_size:
        raise ValueError(
            f"the checkpoint's LLM has hidden size {hidden_size} but the base config says {text_config.hidden_size}: "
            "is it the config of the LLM the checkpoint was trained from?"
        )
    text_config.vocab_size = vocab_rows
    if is_tuna_r:
        image_fields = vision_config_from_shapes(shapes, vision_config)
    else:
        _, num_channels, patch_size, _ = shapes[PATCH_CONV]
        image_fields = dict(patch_size=patch_size, num_channels=num_channels)
    (head_dim,) = shapes[FLOW_Q_NORM]
    for projection in (FLOW_Q_PROJ, FLOW_K_PROJ):
        if shapes[projection][0] % head_dim:
            raise ValueError(
                f"{hf_to_official_key(projection)} has {shapes[projection][0]} rows, not a multiple of the "
                f"head dim {head_dim} given by {hf_to_official_key(FLOW_Q_NORM)}"
            )
    return dict(
        **image_fields,
        timestep_frequency_dim=shapes[TIME_MLP_IN][1],
        flow_head_num_layers=1 + max(int(m.group(1)) for key in shapes if (m := FLOW_LAYER.match(key))),
        flow_head_num_attention_heads=shapes[FLOW_Q_PROJ][0] // head_dim,
        flow_head_num_key_value_heads=shapes[FLOW_K_PROJ][0] // head_dim,
        flow_head_head_dim=head_dim,
        flow_head_intermediate_size=shapes[FLOW_GATE_PROJ][0],
        use_mask_token=MASK_TOKEN in shapes,
    )


def check_vocabulary(config: Tuna2Config, tokenizer: PreTrainedTokenizerBase):
    """Every token id must have a row in the embeddings; extra rows (a padded vocabulary) are allowed."""
    rows = config.text_config.vocab_size
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} entries after the official setup but the embeddings only {rows} "
            "rows: is --tokenizer the tokenizer of the checkpoint's base LLM?"
        )
    if len(tokenizer) < rows:
        logger.warning(f"the embeddings have {rows} rows for {len(tokenizer)} tokens; the extra rows are never used")


def describe_config(config: Tuna2Config) -> str:
    text = config.text_config
    description = (
        f"hidden size {text.hidden_size}, {text.num_hidden_layers} LLM layers, vocabulary {text.vocab_size}, "
        f"{config.flow_head_num_layers} flow-head blocks with {config.flow_head_num_attention_heads}/"
        f"{config.flow_head_num_key_value_heads} heads, patch {config.patch_size}"
    )
    if config.vision_config is not None:
        vision = config.vision_config
        description += (
            f"; Tuna-R: SigLIP of width {vision.hidden_size}, {config.num_vision_layers} of its "
            f"{vision.num_hidden_layers} layers, position table for {vision.image_size} pixels"
        )
    return description


def check_keys_and_shapes(checkpoint: OfficialCheckpoint, expected: dict[str, tuple[int, ...]], config: Tuna2Config):
    """Raises a `ValueError` listing every missing, unexpected and mis-shaped key (official names, as in the file)."""
    found = checkpoint.infos
    missing = [hf_to_official_key(key) for key in expected if key not in found]
    unexpected = [checkpoint.file_keys[key] for key in found if key not in expected] + checkpoint.unmapped_keys
    misshaped = [
        f"{checkpoint.file_keys[key]}: {list(found[key].shape)} in the checkpoint, {list(shape)} expected"
        for key, shape in expected.items()
        if key in found and found[key].shape != shape
    ]
    if missing or unexpected or misshaped:
        lines = [f"{checkpoint.path} does not fit the Tuna-2 model read off its shapes ({describe_config(config)}):"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if keys:
                lines += [f"  {title} ({len(keys)}):", *(f"    {key}" for key in keys)]
        raise ValueError("\n".join(lines))


def understanding_generation_config(config: Tuna2Config, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """The official evaluation decoding: greedy, at most 512 new tokens, stopping at <|im_end|>."""
    text_config = config.text_config
    return GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=OFFICIAL_MAX_NEW_TOKENS,
    )


def tuna2_processor(tokenizer: PreTrainedTokenizerBase, config: Tuna2Config) -> Tuna2Processor:
    return Tuna2Processor(image_processor=Tuna2ImageProcessor(patch_size=config.patch_size), tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# Weight statistics (--report)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorStatistics:
    shape: tuple[int, ...]
    mean: float
    std: float
    abs_max: float


def tensor_statistics(tensor: torch.Tensor, chunk_size: int = 1 << 22) -> TensorStatistics:
    """Mean, std and absolute maximum in float64, over chunks so that a large embedding is not copied at once."""
    count, mean, sum_squares, abs_max = 0, 0.0, 0.0, 0.0
    for chunk in tensor.detach().reshape(-1).split(chunk_size):
        values = chunk.double()
        chunk_var, chunk_mean = (value.item() for value in torch.var_mean(values, correction=0))
        # Chan et al.'s pairwise update: exact for constant tensors, unlike E[x^2] - E[x]^2.
        delta, total = chunk_mean - mean, count + values.numel()
        mean += delta * values.numel() / total
        sum_squares += chunk_var * values.numel() + delta**2 * count * values.numel() / total
        count, abs_max = total, max(abs_max, values.abs().max().item())
    return TensorStatistics(tuple(tensor.shape), mean, math.sqrt(sum_squares / count), abs_max)


def init_candidates(shape: tuple[int, ...], init_stds: Iterable[float]) -> list[tuple[str, float, float | None]]:
    """The random initialisations the official code may have drawn a weight of `shape` (out, in) from: `(label, std,
    bound)`, `bound` None for a normal draw. The LLM's linears: N(0, initializer_range) (transformers'
    `_init_weights`); the flow-head linears: PyTorch's default kaiming-uniform (`init_tuna2_from_qwen2`), or xavier
    as the official code means to (uniform or normal)."""
    fan_out, fan_in = shape
    xavier = math.sqrt(2 / (fan_in + fan_out))
    return [
        *((f"normal(0, {std:g})", std, None) for std in sorted(set(init_stds))),
        ("kaiming-uniform", 1 / math.sqrt(3 * fan_in), 1 / math.sqrt(fan_in)),
        ("xavier-uniform", xavier, math.sqrt(3) * xavier),
        ("xavier-normal", xavier, None),
    ]


def matches_distribution(stats: TensorStatistics, std: float, bound: float | None) -> bool:
    """Whether a tensor with these statistics looks drawn i.i.d. from N(0, std) (`bound` None) or U(-bound, bound)."""
    count = math.prod(stats.shape)
    if abs(stats.std / std - 1) > FRESH_SIGMAS / math.sqrt(2 * count) + FRESH_SLACK:
        return False
    if abs(stats.mean) > (FRESH_SIGMAS / math.sqrt(count) + FRESH_SLACK) * std:
        return False
    if bound is not None:  # a uniform draw never leaves its bounds
        return stats.abs_max <= bound * (1 + FRESH_SLACK)
    # a normal draw of more than a few dozen values leaves the range of the uniform with the same std
    return stats.abs_max > math.sqrt(3) * std * (1 + FRESH_SLACK)


class WeightStatistics:
    """Statistics of the converted weights, and flags that point at re-initialised layers: constant tensors (a norm
    weight of exactly 1, a zeroed linear) and weights whose std is more than `STD_OUTLIER_FACTOR` times off the median
    std of the same weight in the other layers (compared when there are at least 3 layers).

    `fresh_layers` gives the layers whose tensors all look freshly initialised (`initialisation`): the rule does not
    compare layers with each other, so it finds a re-initialised layer however many there are, and a trained layer
    is never taken for a fresh one, as no trained norm weight is exactly 1."""

    def __init__(self, init_stds: Iterable[float] = (0.02,)):
        self.tensors: dict[str, TensorStatistics] = {}
        self.init_stds = tuple(init_stds)

    def add(self, name: str, tensor: torch.Tensor):
        self.tensors[name] = tensor_statistics(tensor)

    def flags(self) -> dict[str, list[str]]:
        flags = defaultdict(list)
        same_weight = defaultdict(list)
        for name, stats in self.tensors.items():
            if stats.std == 0:
                flags[name].append(f"constant {stats.mean:g}")
            same_weight[re.sub(r"\.layers\.\d+\.", ".layers.*.", name)].append(name)
        for names in same_weight.values():
            stds = [self.tensors[name].std for name in names]
            reference = median(stds)
            if len(names) < 3 or reference == 0:
                continue
            for name, std in zip(names, stds):
                if std > 0 and not 1 / STD_OUTLIER_FACTOR <= std / reference <= STD_OUTLIER_FACTOR:
                    flags[name].append(f"std {std / reference:.2f}x the median of its {len(names)} layers")
        return dict(flags)

    def initialisation(self, name: str) -> str | None:
        """The official initialisation the tensor `name` looks freshly drawn from, or None: `ones` (a norm weight of
        exactly 1), `zeros` (an adaLN-Zero linear, a zero bias), or a random draw of `init_candidates` (a matrix; a
        bias: PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the fan-in of its weight)."""
        stats = self.tensors[name]
        is_norm = "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if stats.std == 0:
            if is_norm:
                return "ones" if stats.mean == 1 else None
            return "zeros" if stats.mean == 0 else None
        if is_norm:
            return None
        if len(stats.shape) == 2:
            candidates = init_candidates(stats.shape, self.init_stds)
        elif len(stats.shape) == 1 and name.endswith(".bias") and name[: -len("bias")] + "weight" in self.tensors:
            fan_in = self.tensors[name[: -len("bias")] + "weight"].shape[-1]
            candidates = [("uniform bias", 1 / math.sqrt(3 * fan_in), 1 / math.sqrt(fan_in))]
        else:
            return None
        return next(
            (label for label, std, bound in candidates if matches_distribution(stats, std, bound)),
            None,
        )

    def fresh_layers(self) -> list[str]:
        """Name prefixes (`model.language_model.layers.5.`, `flow_head.layers.3.`, `flow_head.final_layer.`) of the
        layers whose every tensor looks freshly initialised, in the order of the weights."""
        layers = defaultdict(list)
        for name in self.tensors:
            if match := LAYER_PREFIX.match(name):
                layers[match.group(1)].append(name)
        return [prefix for prefix, names in layers.items() if all(self.initialisation(name) for name in names)]

    def format_fresh_layers(self) -> str:
        fresh = self.fresh_layers()
        if not fresh:
            return "No layer looks freshly initialised"
        lines = [f"{len(fresh)} layer(s) look freshly initialised (every tensor as an official init draws it):"]
        for prefix in fresh:
            kinds = Counter(self.initialisation(name) for name in self.tensors if name.startswith(prefix))
            lines.append(f"  {prefix}  ({', '.join(f'{count} {kind}' for kind, count in kinds.items())})")
        return "\n".join(lines)

    def format(self) -> str:
        flags = self.flags()
        width = max(map(len, self.tensors))
        lines = [f"{'weight':<{width}}  {'shape':<20} {'mean':>11} {'std':>10} {'abs max':>10}  flags"]
        for name, stats in self.tensors.items():
            lines.append(
                f"{name:<{width}}  {str(list(stats.shape)):<20} {stats.mean:>11.4g} {stats.std:>10.4g} "
                f"{stats.abs_max:>10.4g}  {'; '.join(flags.get(name, []))}"
            )
        lines.append(self.format_fresh_layers())
        lines.append(f"{len(flags)} of {len(self.tensors)} weights flagged")
        return "\n".join(lines)


def write_fresh_layers(statistics: WeightStatistics, path: str | Path, checkpoint: str | Path) -> list[str]:
    """Writes the prefixes of the layers that look freshly initialised to `path`, one a line after `#` comments, the
    file `examples/sft.py --train-only-file` reads; returns them."""
    fresh = statistics.fresh_layers()
    header = [
        f"# Layers of {checkpoint} that look freshly initialised (tuna2 convert --report).",
        "# One parameter-name prefix a line; train them with: examples/sft.py --train-only-file THIS_FILE",
    ]
    Path(path).write_text("\n".join(header + fresh) + "\n")
    return fresh


# ----------------------------------------------------------------------------------------------------------------
# Writing the folder
# ----------------------------------------------------------------------------------------------------------------


def check_output_folder(output: Path):
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"{output} exists and is not an empty folder")


def write_shard(
    read: Callable[[str], torch.Tensor],
    names: list[str],
    path: Path,
    dtype: torch.dtype | None,
    statistics: WeightStatistics | None,
):
    tensors = {}
    for name in names:
        tensor = read(name)
        tensors[name] = (tensor if dtype is None else tensor.to(dtype)).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    if statistics is not None:
        for name, tensor in tensors.items():
            statistics.add(name, tensor)


def write_weights(
    checkpoint: OfficialCheckpoint,
    names: list[str],
    output: Path,
    dtype: torch.dtype | None,
    max_shard_size: int | str,
    statistics: WeightStatistics | None = None,
):
    """Writes `names` (our keys, in this order) as `model.safetensors` or as shards with their index, one shard at a
    time."""
    sizes = {
        name: torch.empty(checkpoint.infos[name].shape, dtype=dtype or checkpoint.infos[name].dtype, device="meta")
        for name in names
    }
    split = split_torch_state_dict_into_shards(
        sizes, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, shard_names in split.filename_to_tensors.items():
        # Mapping the file afresh for each shard releases the pages read for the previous ones.
        with checkpoint.open() as read:
            write_shard(read, shard_names, output / filename, dtype, statistics)
    if split.is_sharded:
        total_parameters = sum(math.prod(checkpoint.infos[name].shape) for name in names)
        index = {
            "metadata": {"total_parameters": total_parameters, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_model_files(model: Tuna2ForConditionalGeneration, output: Path):
    """What `save_pretrained` writes besides the weights: the config (with the architecture and the `auto_map` of
    the remote code), the generation config and the modeling code."""
    model.config.architectures = [type(model).__name__]
    if model.is_remote_code():
        custom_object_save(model, output, config=model.config)
    model.config.save_pretrained(output)
    model.generation_config.save_pretrained(output)


def convert(
    checkpoint_path: str | Path,
    tokenizer_path: str | Path,
    output: str | Path,
    base_config: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    report: bool = False,
    siglip_config: str | Path | None = None,
) -> tuple[Tuna2Config, WeightStatistics | None]:
    """Converts an official checkpoint into the shared folder `output`. Returns the configuration and, with `report`,
    the statistics of the written weights. Everything is checked before anything is written. A Tuna-R checkpoint
    needs `siglip_config`, the SigLIP config (folder or `config.json`) it was built from."""
    output = Path(output)
    check_output_folder(output)
    checkpoint = OfficialCheckpoint(checkpoint_path)
    tokenizer = load_official_tokenizer(tokenizer_path)
    text_config = load_text_config(base_config or tokenizer_path)
    vision_config = load_vision_config(siglip_config) if siglip_config is not None else None
    config = tuna2_config(
        text_config, tokenizer, output_layout="raster", **config_from_shapes(checkpoint, text_config, vision_config)
    )
    check_vocabulary(config, tokenizer)
    with torch.device("meta"):
        model = Tuna2ForConditionalGeneration(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    check_keys_and_shapes(checkpoint, expected, config)

    config.dtype = config.text_config.dtype = str(dtype or checkpoint.dominant_dtype()).removeprefix("torch.")
    model.generation_config = understanding_generation_config(config, tokenizer)
    processor = tuna2_processor(tokenizer, config)
    init_stds = (config.initializer_range, config.text_config.initializer_range)
    statistics = WeightStatistics(init_stds) if report else None
    output.mkdir(parents=True, exist_ok=True)
    write_weights(checkpoint, list(expected), output, dtype, max_shard_size, statistics)
    save_model_files(model, output)
    processor.save_pretrained(output)
    return config, statistics


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="official checkpoint (.pt, .pth, .bin or .safetensors)")
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="folder of the base LLM (Qwen2.5-7B-Instruct): its tokenizer, and its config.json unless --base-config",
    )
    parser.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument(
        "--base-config", help="the base LLM's Qwen2 config.json (file or folder), if not in --tokenizer"
    )
    parser.add_argument(
        "--siglip-config",
        help="Tuna-R only: the SigLIP config (folder or config.json) its vision encoder was built from",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep the checkpoint's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: 5GB)")
    parser.add_argument("--report", action="store_true", help="print per-weight statistics and flag outliers")
    parser.add_argument(
        "--fresh-layers-out",
        metavar="FILE",
        help="write the name prefixes of the layers that look freshly initialised to FILE, one a line (implies "
        "--report), for examples/sft.py --train-only-file",
    )
    args = parser.parse_args(argv)
    args.report = args.report or args.fresh_layers_out is not None
    args.prog = parser.prog
    return args


def run_command(run: Callable[[argparse.Namespace], str], args: argparse.Namespace) -> int:
    """Runs `run(args)` and prints what it returns; returns the exit code. Bad input (`ValueError`, `OSError`) is
    reported as argparse reports bad options, `prog: error: ...`, without a traceback; exit code 1."""
    try:
        message = run(args)
    except (ValueError, OSError) as error:
        print(f"{args.prog}: error: {error}", file=sys.stderr)
        return 1
    print(message)
    return 0


def run(args: argparse.Namespace) -> str:
    """Converts as `args` (from `parse_args`) say; returns what to print. Bad input raises `ValueError` or
    `OSError`."""
    config, statistics = convert(
        args.checkpoint,
        args.tokenizer,
        args.output,
        base_config=args.base_config,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        max_shard_size=args.max_shard_size,
        report=args.report,
        siglip_config=args.siglip_config,
    )
    summary = f"Wrote {args.output}: {describe_config(config)}"
    if statistics is None:
        return summary
    if args.fresh_layers_out is not None:
        fresh = write_fresh_layers(statistics, args.fresh_layers_out, args.checkpoint)
        summary += f"\nWrote the {len(fresh)} freshly initialised layer(s) to {args.fresh_layers_out}"
    return f"{statistics.format()}\n{summary}"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Runs the command line (`prog` names it in the usage and errors: `tuna2 convert`); returns the exit code."""
    return run_command(run, parse_args(argv, prog))


if __name__ == "__main__":
    sys.exit(main())
