"""Tuna-2: a unified multimodal model on raw pixels (arXiv 2604.24763).

A Conv2d patch embedding feeds Qwen2 directly (no vision encoder, no VAE). Tuna-R, the paper's encoder variant (a
config with a `vision_config`), embeds the same pixels with a truncated SigLIP vision encoder and a projector instead.
Each image occupies one span of the token sequence: a time slot (the timestep embedding) followed by one slot per
patch. Attention is causal, and bidirectional inside each span. For generation, a flow head of adaLN-Zero blocks reads
the LLM's final hidden states and predicts the clean image (x0) of every span.

Flow-matching convention used throughout: t=1 is the clean image, t=0 is pure noise.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import nn
from transformers import GenerationMixin, LlamaConfig, Qwen2Model, SiglipVisionModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_bidirectional_sliding_window_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, eager_attention_forward, rotate_half
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple
from transformers.utils.import_utils import is_torchdynamo_compiling

from .configuration_tuna2 import Tuna2Config, Tuna2ImageRole
from .flow_matching import noisy_image, sample_training_t, v_loss_weight
from .image_utils import make_image_list, stack_if_same_size

logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Image spans
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Tuna2ImageSpans:
    """Where the images sit in a batch of token ids. Images are numbered sample-major, then left to right.

    Attributes:
        image_index (`torch.LongTensor` of shape `(batch_size, seq_len)`):
            Index of the image whose span holds the position, -1 outside spans.
        span_position (`torch.LongTensor` of shape `(batch_size, seq_len)`):
            Position inside the span: 0 is the time slot, `1 + j` is patch j. -1 outside spans.
        lengths (`list[int]`):
            Length of each span (1 + number of patches).
        grids (`list[tuple[int, int]]`):
            Patch grid `(h, w)` of each image, once the spans are matched with their images.
    """

    image_index: torch.LongTensor
    span_position: torch.LongTensor
    lengths: list[int]
    grids: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def from_input_ids(cls, input_ids: torch.LongTensor, image_token_id: int) -> "Tuna2ImageSpans":
        is_image = input_ids == image_token_id
        previous_is_image = nn.functional.pad(is_image[:, :-1], (1, 0), value=False)
        starts = is_image & ~previous_is_image
        image_index = torch.where(is_image, starts.flatten().cumsum(0).view_as(starts) - 1, -1)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        span_start = torch.where(starts, positions, 0).cummax(dim=1).values
        span_position = torch.where(is_image, positions - span_start, -1)
        lengths = torch.bincount(image_index[is_image], minlength=int(starts.sum())).tolist()
        return cls(image_index=image_index, span_position=span_position, lengths=lengths)

    @classmethod
    def without_images(cls, batch_size: int, seq_len: int, device: torch.device) -> "Tuna2ImageSpans":
        """No spans, read without looking at the ids (no data-dependent step, for compiled and exported decoding)."""
        no_span = torch.full((batch_size, seq_len), -1, dtype=torch.long, device=device)
        return cls(image_index=no_span, span_position=no_span, lengths=[])

    @property
    def num_images(self) -> int:
        return len(self.lengths)

    @property
    def is_image(self) -> torch.BoolTensor:
        return self.span_position >= 0

    @property
    def is_patch(self) -> torch.BoolTensor:
        return self.span_position > 0

    @property
    def fill_each_row(self) -> bool:
        """Whether each row is one whole image span, as in a denoising step after a cached prefix: every position then
        attends to every key (the cached ones before it, and its own span), so only padding masks anything."""
        batch_size, seq_len = self.image_index.shape
        return self.num_images == batch_size and all(length == seq_len for length in self.lengths)


def check_image_sizes(images: list[torch.Tensor], patch_size: int, num_channels: int) -> list[tuple[int, int]]:
    """Returns the patch grid `(h, w)` of each image, or raises a `ValueError` naming the first bad image."""
    grids = []
    for i, image in enumerate(images):
        channels, height, width = image.shape
        if channels != num_channels:
            raise ValueError(f"image {i} has {channels} channels, the model expects {num_channels}")
        if height == 0 or width == 0:
            raise ValueError(f"image {i} has zero size ({height}x{width})")
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"image {i} is {height}x{width}: height and width must be multiples of the patch size {patch_size}"
            )
        grids.append((height // patch_size, width // patch_size))
    return grids


# ----------------------------------------------------------------------------------------------------------------
# Layouts of the flow head's per-token output
# ----------------------------------------------------------------------------------------------------------------


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch_size: int, layout: str) -> torch.Tensor:
    """`(h*w, p*p*C)` flow-head outputs of one image -> `(C, h*p, w*p)` pixels.

    "raster" (official): the outputs are flattened as they are into raster-order pixels with the channel fastest,
    so token k holds pixels `[k p^2, (k+1) p^2)` of the raster scan. "patch": token k holds patch k, ordered
    (row in patch, column in patch, channel).
    """
    h, w = grid
    channels = tokens.shape[-1] // (patch_size * patch_size)
    if layout == "raster":
        return tokens.reshape(h * patch_size, w * patch_size, channels).permute(2, 0, 1)
    patches = tokens.reshape(h, w, patch_size, patch_size, channels)
    return patches.permute(4, 0, 2, 1, 3).reshape(channels, h * patch_size, w * patch_size)


# ----------------------------------------------------------------------------------------------------------------
# Initialisation marks
# ----------------------------------------------------------------------------------------------------------------


def with_official_init(linear: nn.Linear, weight: str = "kaiming_uniform") -> nn.Linear:
    """Marks `linear` for [`Tuna2PreTrainedModel._init_weights`] to start as the official model starts: its weight
    from PyTorch's default (`"kaiming_uniform"`) or from N(0, `initializer_range`) (`"normal"`), its bias from
    PyTorch's default, uniform in `+-1/sqrt(in_features)`. A mark rather than a subclass, since bitsandbytes quantizes
    plain `nn.Linear` modules only."""
    linear.official_weight_init = weight
    return linear


# ----------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------


class Tuna2PatchEmbedding(nn.Module):
    """Conv2d patchifier followed by an RMSNorm over the channels: `(n, C, H, W)` -> `(n, h*w, hidden_size)`,
    token k being patch `(k // w, k % w)`."""

    def __init__(self, config: Tuna2Config):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=True
        )
        self.norm = nn.RMSNorm(hidden_size, eps=config.patch_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return self.norm(embeddings.flatten(2).transpose(1, 2))


def timestep_sinusoids(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """`(n,)` times -> `(n, dim)` fp32 features `[cos(t f_k), sin(t f_k)]`, `f_k = max_period^(-k / (dim/2))`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Tuna2TimestepEmbedder(nn.Module):
    """Embeds the raw flow time t in [0, 1] (not scaled by 1000) of each image."""

    def __init__(self, config: Tuna2Config):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.frequency_dim = config.timestep_frequency_dim
        self.mlp = nn.Sequential(
            with_official_init(nn.Linear(self.frequency_dim, hidden_size, bias=True), weight="normal"),
            nn.SiLU(),
            with_official_init(nn.Linear(hidden_size, hidden_size, bias=True), weight="normal"),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        # The official model quantises t to the model dtype before embedding it.
        return self.mlp(timestep_sinusoids(t.to(dtype), self.frequency_dim).to(dtype))


class Tuna2MultiModalProjector(nn.Module):
    """Tuna-R: SigLIP features `(n, num_patches, vision_hidden_size)` -> LLM embeddings
    `(n, num_patches, hidden_size)`, through RMSNorm, Linear, GELU (exact) and Linear (the official `siglip_proj`)."""

    def __init__(self, config: Tuna2Config):
        super().__init__()
        vision_hidden_size, hidden_size = config.vision_config.hidden_size, config.text_config.hidden_size
        self.norm = Qwen2RMSNorm(vision_hidden_size, eps=config.projector_norm_eps)
        # The official code means to xavier-initialise them but calls its init on the `nn.Sequential` instead of
        # through `.apply`: they start from PyTorch's default, as the flow-head blocks.
        self.linear_1 = with_official_init(nn.Linear(vision_hidden_size, hidden_size))
        self.act = nn.GELU()
        self.linear_2 = with_official_init(nn.Linear(hidden_size, hidden_size))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.norm(image_features))))


def truncated_vision_tower(config: Tuna2Config) -> SiglipVisionModel:
    """Tuna-R's encoder: transformers' SigLIP vision model with the layers after `config.vision_feature_layer`
    removed and no final LayerNorm (the official model replaces it with the identity), so that its
    `last_hidden_state` is the output of the feature layer. It is built on `config.vision_config` itself, so that the
    attention implementation chosen for the model reaches it."""
    tower = SiglipVisionModel(config.vision_config)
    tower.encoder.layers = tower.encoder.layers[: config.num_vision_layers]
    tower.post_layernorm = nn.Identity()
    return tower


# ----------------------------------------------------------------------------------------------------------------
# Flow-head rotary embeddings: 1-D llama3 RoPE on text, none on time slots, 3-D RoPE (rotation by -theta) on patches
# ----------------------------------------------------------------------------------------------------------------


def image_rope_omegas(sections: list[int], theta: float) -> list[torch.Tensor]:
    """Per axis (frame, row, column) with `d` channels: `omega_k = theta^(-2k/d)`, k < d/2."""
    return [1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)) for d in sections]


def apply_text_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, in the activation dtype as the official head does."""
    return x * cos + rotate_half(x) * sin


def apply_image_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE rotating each pair `(x[2m], x[2m+1])` by **-theta** (the official sign):
    `(x0 cos + x1 sin, x1 cos - x0 sin)`. `cos`/`sin` have one entry per pair; the products are summed in fp32 and
    rounded once, like the official 2x2 matmul."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.float(), sin.float()
    return torch.stack((x0 * cos + x1 * sin, x1 * cos - x0 * sin), dim=-1).flatten(-2).to(x.dtype)


class Tuna2FlowHeadRotary(NamedTuple):
    """Rotary tables of one flow-head call, each of shape `(batch_size, 1, seq_len, ...)` to broadcast over heads.

    A tuple of tensors, as the language model's `position_embeddings`, so that the hooks that place the blocks of a
    model split over devices (`device_map`) move them to each block's execution device with the block's other inputs.
    """

    text_cos: torch.Tensor
    text_sin: torch.Tensor
    image_cos: torch.Tensor
    image_sin: torch.Tensor
    is_text: torch.BoolTensor
    is_patch: torch.BoolTensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        rotated_text = apply_text_rope(x, self.text_cos, self.text_sin)
        rotated_image = apply_image_rope(x, self.image_cos, self.image_sin)
        return torch.where(self.is_patch, rotated_image, torch.where(self.is_text, rotated_text, x))


class Tuna2FlowHeadRotaryEmbedding(nn.Module):
    """Builds the rotary tables of a flow-head call. The text frequencies are llama3-scaled RoPE, computed by
    `modeling_rope_utils`. The frequencies are fp32 attributes rather than buffers, so that casting the model to bf16
    cannot round them; they are copied once to each device the head runs on."""

    def __init__(self, config: Tuna2Config):
        super().__init__()
        scaling = config.flow_head_rope_scaling
        rope_config = LlamaConfig(
            head_dim=config.flow_head_head_dim,
            max_position_embeddings=int(scaling["original_max_position_embeddings"] * scaling["factor"]),
            rope_parameters={**scaling, "rope_theta": config.flow_head_rope_theta},
        )
        with torch.device("cpu"):  # real values even when the model is built on the meta device to be loaded
            self.text_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](rope_config)
            self.image_omegas = image_rope_omegas(config.image_rope_sections, config.image_rope_theta)
        self.frequencies_by_device: dict[torch.device, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def frequencies(self, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The text inverse frequencies and the per-axis image frequencies, on `device`."""
        if device not in self.frequencies_by_device:
            self.frequencies_by_device[device] = (
                self.text_inv_freq.to(device),
                [omega.to(device) for omega in self.image_omegas],
            )
        return self.frequencies_by_device[device]

    def forward(
        self, dtype: torch.dtype, position_ids: torch.LongTensor, spans: Tuna2ImageSpans
    ) -> Tuna2FlowHeadRotary:
        """
        Args:
            position_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): absolute positions of text tokens.
            spans (`Tuna2ImageSpans`): the image spans of the sequence, with their grids.
        """
        device = position_ids.device
        text_inv_freq, image_omegas = self.frequencies(device)
        freqs = position_ids[..., None].float() * text_inv_freq
        text_angles = torch.cat((freqs, freqs), dim=-1)
        # Every span restarts its patch grid at (0, 0, 0): in editing, source and target share positions.
        patch = (spans.span_position.to(device) - 1).clamp(min=0)
        if spans.num_images:
            grid_widths = torch.tensor([width for _, width in spans.grids], device=device)
            width = grid_widths[spans.image_index.to(device).clamp(min=0)]
        else:
            width = torch.ones_like(patch)
        frame = torch.zeros_like(patch)
        image_angles = torch.cat(
            [
                axis_pos[..., None].float() * omega
                for axis_pos, omega in zip((frame, patch // width, patch % width), image_omegas)
            ],
            dim=-1,
        )
        return Tuna2FlowHeadRotary(
            text_cos=text_angles.cos().to(dtype)[:, None],
            text_sin=text_angles.sin().to(dtype)[:, None],
            image_cos=image_angles.cos().to(dtype)[:, None],
            image_sin=image_angles.sin().to(dtype)[:, None],
            is_text=(spans.image_index < 0).to(device)[:, None, :, None],
            is_patch=spans.is_patch.to(device)[:, None, :, None],
        )


# ----------------------------------------------------------------------------------------------------------------
# Flow head
# ----------------------------------------------------------------------------------------------------------------


class Tuna2ZeroInitLinear(nn.Linear):
    """A linear layer initialised to zero (adaLN-Zero): each flow-head block starts as the identity on image spans
    and the head's first prediction is 0."""


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation `x (1 + scale) + shift`, computed in fp32."""
    return (x.float() * (1 + scale.float()) + shift.float()).to(x.dtype)


def modulation_per_position(
    params: torch.Tensor, neutral: torch.Tensor, image_index: torch.LongTensor
) -> tuple[torch.Tensor, ...]:
    """Spreads per-image adaLN parameters `(num_images, k, D)` over the sequence: positions of image i get row i,
    positions outside spans get `neutral` `(k, D)` (shift 0, scale 0, gate 1). Returns k tensors `(B, L, D)`."""
    table = torch.cat([neutral[None].to(params.dtype), params], dim=0)
    return table[image_index + 1].unbind(dim=2)


class Tuna2FlowHeadAttention(nn.Module):
    """GQA self-attention with per-head RMSNorm on queries and keys, no biases."""

    def __init__(self, config: Tuna2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        hidden_size = config.text_config.hidden_size
        self.head_dim = config.flow_head_head_dim
        self.num_key_value_groups = config.flow_head_num_attention_heads // config.flow_head_num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        query_size = config.flow_head_num_attention_heads * self.head_dim
        key_value_size = config.flow_head_num_key_value_heads * self.head_dim
        self.q_proj = with_official_init(nn.Linear(hidden_size, query_size, bias=False))
        self.k_proj = with_official_init(nn.Linear(hidden_size, key_value_size, bias=False))
        self.v_proj = with_official_init(nn.Linear(hidden_size, key_value_size, bias=False))
        self.o_proj = with_official_init(nn.Linear(query_size, hidden_size, bias=False))
        self.q_norm = Qwen2RMSNorm(self.head_dim, eps=config.flow_head_qk_norm_eps)
        self.k_norm = Qwen2RMSNorm(self.head_dim, eps=config.flow_head_qk_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: Tuna2FlowHeadRotary,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = rotary.apply(self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2))
        key = rotary.apply(self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2))
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        return self.o_proj(attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous())


class Tuna2FlowHeadMLP(nn.Module):
    def __init__(self, config: Tuna2Config):
        super().__init__()
        hidden_size, intermediate_size = config.text_config.hidden_size, config.flow_head_intermediate_size
        self.gate_proj = with_official_init(nn.Linear(hidden_size, intermediate_size, bias=False))
        self.up_proj = with_official_init(nn.Linear(hidden_size, intermediate_size, bias=False))
        self.down_proj = with_official_init(nn.Linear(intermediate_size, hidden_size, bias=False))
        self.act_fn = ACT2FN[config.flow_head_hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Tuna2FlowHeadBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block with adaLN-Zero modulation on image-span positions only; text positions pass
    through the same weights unmodulated (shift 0, scale 0, gate 1) and serve as keys and values."""

    def __init__(self, config: Tuna2Config, layer_idx: int):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.self_attn = Tuna2FlowHeadAttention(config, layer_idx)
        self.mlp = Tuna2FlowHeadMLP(config)
        self.input_layernorm = Qwen2RMSNorm(hidden_size, eps=config.flow_head_rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(hidden_size, eps=config.flow_head_rms_norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Tuna2ZeroInitLinear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        hidden_states: torch.Tensor,
        time_embeds: torch.Tensor,
        image_index: torch.LongTensor,
        rotary: Tuna2FlowHeadRotary,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        params = self.adaLN_modulation(time_embeds).unflatten(-1, (6, -1))
        # Outside image spans: shift 0, scale 0, gate 1.
        neutral = params.new_tensor([0.0, 0.0, 1.0, 0.0, 0.0, 1.0])[:, None].expand(6, params.shape[-1])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation_per_position(
            params, neutral, image_index
        )
        attn_input = modulate(self.input_layernorm(hidden_states), shift_msa, scale_msa)
        attn_output = self.self_attn(attn_input, rotary, attention_mask, past_key_values, **kwargs)
        hidden_states = hidden_states + gate_msa * attn_output
        mlp_input = modulate(self.post_attention_layernorm(hidden_states), shift_mlp, scale_mlp)
        return hidden_states + gate_mlp * self.mlp(mlp_input)


class Tuna2FlowHeadFinalLayer(nn.Module):
    """Modulated RMSNorm and a linear projection to `patch_size**2 * num_channels` pixel values per token."""

    def __init__(self, config: Tuna2Config):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.norm_final = Qwen2RMSNorm(hidden_size, eps=config.flow_head_final_norm_eps)
        self.linear = Tuna2ZeroInitLinear(hidden_size, config.patch_size**2 * config.num_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Tuna2ZeroInitLinear(hidden_size, 2 * hidden_size))

    def forward(self, hidden_states: torch.Tensor, time_embeds: torch.Tensor, image_index: torch.LongTensor):
        params = self.adaLN_modulation(time_embeds).unflatten(-1, (2, -1))
        shift, scale = modulation_per_position(params, params.new_zeros(params.shape[1:]), image_index)
        return self.linear(modulate(self.norm_final(hidden_states), shift, scale))


class Tuna2FlowHead(nn.Module):
    """Runs over the whole sequence with the LLM's mask; modulation and the 3-D RoPE concern image spans only."""

    def __init__(self, config: Tuna2Config):
        super().__init__()
        self.layers = nn.ModuleList([Tuna2FlowHeadBlock(config, i) for i in range(config.flow_head_num_layers)])
        self.final_layer = Tuna2FlowHeadFinalLayer(config)
        self.rotary_emb = Tuna2FlowHeadRotaryEmbedding(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        time_embeds: torch.Tensor,
        spans: Tuna2ImageSpans,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, seq_len, hidden_size)`): the LLM's final (normed)
                hidden states.
            time_embeds (`torch.Tensor` of shape `(num_images, hidden_size)`): the adaLN conditioning of each image.
            spans ([`Tuna2ImageSpans`]): the image spans of the sequence, with their grids.
            position_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`), attention_mask: the language model's.
            past_key_values (`Cache`, *optional*): keys and values of earlier positions, extended in place.

        Returns:
            `torch.Tensor` of shape `(batch_size, seq_len, patch_size**2 * num_channels)`.
        """
        rotary = self.rotary_emb(hidden_states.dtype, position_ids, spans)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, time_embeds, spans.image_index, rotary, attention_mask, past_key_values, **kwargs
            )
        return self.final_layer(hidden_states, time_embeds, spans.image_index)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Tuna2ImageFeaturesOutput(BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(total_span_slots, hidden_size)`):
        The span embeddings of all images, concatenated: for each image its time slot, then its patches.
    pooler_output (`tuple(torch.FloatTensor)`):
        The same embeddings split per image (`(1 + num_patches, hidden_size)` each), as transformers' VLMs give
        their image embeddings.
    hidden_states, attentions:
        Always `None`: Tuna-2 has no vision encoder, and Tuna-R's SigLIP states are not returned.
    time_embeds (`torch.FloatTensor` of shape `(num_images, hidden_size)`):
        Timestep embedding of each image (its time slot and its adaLN conditioning).
    image_grids (`list[tuple[int, int]]`):
        Patch grid `(h, w)` of each image.
    """

    time_embeds: torch.FloatTensor | None = None
    image_grids: list[tuple[int, int]] | None = None


@dataclass
class Tuna2ModelOutputWithPast(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Final (normed) hidden states of the language model.
    cache (`Cache`, *optional*):
        Key/value cache of the language model.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Hidden states of every language-model layer, when asked for.
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        Attention weights of every language-model layer, when asked for.
    time_embeds (`torch.FloatTensor` of shape `(num_images, hidden_size)`, *optional*):
        Timestep embedding of each image (its time slot and its adaLN conditioning).
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    time_embeds: torch.FloatTensor | None = None


@dataclass
class Tuna2CausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*):
        `lm_loss_weight * lm_loss + flow_loss_weight * flow_loss`, when `labels` or images to noise are given.
    logits (`torch.FloatTensor` of shape `(batch_size, logits_to_keep or sequence_length, vocab_size)`):
        Language-model logits. In training mode with labels, those of the labelled positions only, in batch order:
        `(num_labelled_positions, vocab_size)`.
    cache (`Cache`, *optional*):
        The cache, extended: a [`Tuna2Cache`] when one was given, else the language model's cache.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Hidden states of every language-model layer, when asked for.
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        Attention weights of every language-model layer, when asked for.
    x0 (`torch.FloatTensor` of shape `(num_targets, num_channels, height, width)`, or a list of `(num_channels,
    height, width)` tensors when the images differ in size, *optional*):
        The flow head's prediction of the clean image of every `TARGET` image, in [-1, 1] pixel space (not clamped).
    lm_loss (`torch.FloatTensor`, *optional*):
        Next-token cross-entropy over the labels that are not -100 (0 when there are none).
    flow_loss (`torch.FloatTensor`, *optional*):
        v-weighted x0 error over the pixels of the target images (0 when there are none).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    x0: torch.FloatTensor | list[torch.FloatTensor] | None = None
    lm_loss: torch.FloatTensor | None = None
    flow_loss: torch.FloatTensor | None = None


class Tuna2Cache(Cache):
    """
    The keys and values of both stacks that attend over the sequence, the language model and the flow head, in the
    spirit of transformers' `EncoderDecoderCache`. [`Tuna2ForConditionalGeneration`] extends both at each call, so
    they always hold the same positions; `crop` cuts both. A denoising loop encodes its fixed prefix (the prompt, and
    the source image when editing) once, then runs each step on the image span and crops back to the prefix.

    Args:
        language_model (`Cache`, *optional*): the language model's cache; a `DynamicCache` by default.
        flow_head (`Cache`, *optional*): the flow head's cache; a `DynamicCache` by default.
        config ([`Tuna2Config`], *optional*): configures the default language-model cache.
    """

    def __init__(
        self, language_model: Cache | None = None, flow_head: Cache | None = None, config: Tuna2Config | None = None
    ):
        text_config = config.text_config if config is not None else None
        self.language_model = language_model if language_model is not None else DynamicCache(config=text_config)
        self.flow_head = flow_head if flow_head is not None else DynamicCache()

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(language_model={self.language_model}, flow_head={self.flow_head})"

    def __len__(self) -> int:
        return len(self.language_model)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.language_model.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.language_model.get_mask_sizes(query_length, layer_idx)

    def crop(self, tokens_to_remove: int):
        """Removes the last `-tokens_to_remove` positions (a negative number, as transformers' caches take it) of
        both caches."""
        self.language_model.crop(tokens_to_remove)
        self.flow_head.crop(tokens_to_remove)

    def reset(self):
        self.language_model.reset()
        self.flow_head.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self.language_model.reorder_cache(beam_idx)
        self.flow_head.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        self.language_model.batch_repeat_interleave(repeats)
        self.flow_head.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor):
        self.language_model.batch_select_indices(indices)
        self.flow_head.batch_select_indices(indices)

    @property
    def is_compileable(self) -> bool:
        return self.language_model.is_compileable and self.flow_head.is_compileable


class Tuna2PreTrainedModel(PreTrainedModel):
    config: Tuna2Config
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "Tuna2FlowHeadBlock", "SiglipEncoderLayer", "SiglipVisionEmbeddings"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = True
    # The decoding step (text tokens, no pixel_values) has no data-dependent branch; reading image spans has.
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module):
        """The official initialisation of the parts that do not come from the LLM (the only initialisation: the
        models built from a Qwen2, `init_tuna2_from_qwen2`, start from it too). The LLM and the LM head take
        transformers' N(0, initializer_range)."""
        # Leaf modules only: transformers skips containers without parameters of their own for custom-code models.
        if isinstance(module, Tuna2ZeroInitLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and hasattr(module, "official_weight_init"):
            if module.official_weight_init == "normal":  # the timestep MLP
                init.normal_(module.weight, std=self.config.initializer_range)
            else:
                # The flow-head blocks and Tuna-R's projector. The official code means to xavier-initialise them but
                # calls its init on the module list instead of through `.apply`: the official model was trained from
                # PyTorch's default.
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Conv2d):  # Tuna-2's patch embedding (SigLIP initialises its own modules)
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)  # the LLM's linears and embeddings, the LM head, every norm weight 1
            if isinstance(module, Tuna2Model) and module.mask_token is not None:
                init.normal_(module.mask_token, std=module.mask_token.shape[-1] ** -0.5)


class Tuna2Model(Tuna2PreTrainedModel):
    """The Qwen2 language model with the image embedding (Tuna-2's pixel patch embedding, or Tuna-R's SigLIP vision
    tower and projector), the timestep embedder and the mask token."""

    def __init__(self, config: Tuna2Config):
        super().__init__(config)
        self.language_model = Qwen2Model(config.text_config)
        if config.vision_config is None:
            self.patch_embed = Tuna2PatchEmbedding(config)
            self.vision_tower = self.multi_modal_projector = None
        else:
            self.patch_embed = None
            self.vision_tower = truncated_vision_tower(config)
            self.multi_modal_projector = Tuna2MultiModalProjector(config)
        self.time_embed = Tuna2TimestepEmbedder(config)
        hidden_size = config.text_config.hidden_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if config.use_mask_token else None
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor | list[torch.Tensor], timesteps: torch.Tensor | None = None, **kwargs
    ) -> Tuna2ImageFeaturesOutput:
        """
        Embeds each image into the rows of its span: its time slot, then its patches (Tuna-2's patch embedding, or
        Tuna-R's projected SigLIP features). `output_hidden_states` and `output_attentions` add nothing.

        Args:
            pixel_values (`torch.Tensor` of shape `(num_images, num_channels, height, width)`, or a list of
                `(num_channels, height, width)` tensors): images in [-1, 1].
            timesteps (`torch.Tensor` of shape `(num_images,)`, *optional*): flow time of each image, t=1 (clean)
                by default.

        Returns:
            [`Tuna2ImageFeaturesOutput`]: the span embeddings of all images (each the time slot, then the patches),
            the time embeddings and the patch grids.
        """
        images = make_image_list(pixel_values)
        grids = check_image_sizes(images, self.config.patch_size, self.config.num_channels)
        device = self.time_embed.mlp[0].weight.device
        if device.type == "meta":  # offloaded by accelerate's hooks, which move each module's inputs themselves
            device = images[0].device
        if timesteps is None:
            timesteps = torch.ones(len(images), device=device)
        timesteps = torch.as_tensor(timesteps, device=device).reshape(-1)
        if timesteps.shape[0] != len(images):
            raise ValueError(f"got {timesteps.shape[0]} timesteps for {len(images)} images")
        time_embeds = self.time_embed(timesteps)
        if isinstance(pixel_values, torch.Tensor):
            patch_embeds = list(self.embed_patches(pixel_values.to(device)).unbind(0))
        else:
            patch_embeds = [self.embed_patches(image[None].to(device))[0] for image in images]
        if self.training and self.mask_token is not None:
            patch_embeds = [self.mask_patches(embeds) for embeds in patch_embeds]
        span_embeds = [torch.cat([time[None], patches]) for time, patches in zip(time_embeds, patch_embeds)]
        return Tuna2ImageFeaturesOutput(
            last_hidden_state=torch.cat(span_embeds),
            pooler_output=tuple(span_embeds),
            time_embeds=time_embeds,
            image_grids=grids,
        )

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(n, C, H, W)` images of one size -> `(n, h*w, hidden_size)` patch embeddings, token k being patch
        `(k // w, k % w)`.

        Tuna-R runs SigLIP on the pixels as they are (the noisy `z_t` of an image being generated too, in [-1, 1]
        like SigLIP's own normalisation), and always asks for the interpolated position table, as the official model
        does: transformers resamples it bicubically unless the grid is the table's square grid, with the same rule and
        the same numbers as the transformers release the official model ran on (4.52.4)."""
        if self.vision_tower is None:
            return self.patch_embed(pixel_values)
        features = self.vision_tower(pixel_values, interpolate_pos_encoding=True).last_hidden_state
        return self.multi_modal_projector(features)

    def mask_patches(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        """Masked image modelling (training only): draws r ~ U(mask_ratio_min, mask_ratio_max) and replaces
        int(N r) distinct patch embeddings, when positive, with the learned mask token."""
        num_patches = patch_embeds.shape[0]
        low, high = self.config.mask_ratio_min, self.config.mask_ratio_max
        ratio = low + (high - low) * torch.rand(()).item()
        num_masked = int(num_patches * ratio)
        if num_masked <= 0:
            return patch_embeds
        masked = torch.zeros(num_patches, dtype=torch.bool, device=patch_embeds.device)
        masked[torch.randperm(num_patches, device=patch_embeds.device)[:num_masked]] = True
        return torch.where(masked[:, None], self.mask_token[0].to(patch_embeds.dtype), patch_embeds)

    def placeholder_ids(self, inputs_embeds: torch.Tensor) -> torch.LongTensor:
        """`(B, L)` ids that locate the image spans of `inputs_embeds` given without `input_ids`: `image_token_id`
        where a row is the image token's embedding (as transformers' VLMs find their placeholders), -1 elsewhere."""
        image_token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        is_placeholder = (inputs_embeds == self.get_input_embeddings()(image_token)).all(-1)
        return torch.where(is_placeholder, image_token, -1)

    def image_spans(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        image_grids: list[tuple[int, int]],
    ) -> Tuna2ImageSpans:
        """The image spans of `input_ids` (or of `inputs_embeds` given without ids), with the patch grid of each image.
        Raises a `ValueError` unless the spans match the images one to one."""
        span_ids = input_ids if input_ids is not None else self.placeholder_ids(inputs_embeds)
        spans = Tuna2ImageSpans.from_input_ids(span_ids, self.config.image_token_id)
        if spans.num_images != len(image_grids):
            raise ValueError(
                f"the input ids hold {spans.num_images} image spans but {len(image_grids)} images were given"
            )
        for i, (length, (h, w)) in enumerate(zip(spans.lengths, image_grids)):
            if length != 1 + h * w:
                raise ValueError(
                    f"image span {i} has {length} slots but image {i} needs {1 + h * w} "
                    f"(1 time slot + {h * w} patches)"
                )
        return replace(spans, grids=image_grids)

    def create_attention_mask(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        position_ids: torch.LongTensor,
        spans: Tuna2ImageSpans,
        layer_types: tuple[str, ...] | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """The masks by layer type, of the language model's `layer_types` by default (`full_attention`, and
        `sliding_attention` when it has sliding-window layers): causal attention, bidirectional inside each image span
        (time slot and patches, not the boi/eoi tokens), with the padding of `attention_mask`. The flow head uses a
        `full_attention` one.

        When each row is one whole image span (a denoising step after a cached prefix), every position sees every
        key: the mask is the padding alone, and `None` (no mask to build, sdpa's fused kernels) without padding; the
        attention must then run with `is_causal=False`."""
        text_config = self.config.text_config
        layer_types = set(layer_types or text_config.layer_types or ["full_attention"])
        has_sliding_layers = "sliding_attention" in layer_types
        mask_kwargs = {
            "config": text_config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache": past_key_values,
        }
        if spans.fill_each_row:
            full_mask, sliding_mask = create_bidirectional_mask, create_bidirectional_sliding_window_mask
        else:
            block_sequence_ids = None
            if spans.num_images > 0:
                # Block ids cover the whole key length; cached positions are text (-1) or earlier spans, both causal.
                past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
                block_sequence_ids = nn.functional.pad(spans.image_index, (past_length, 0), value=-1)
            mask_kwargs.update(position_ids=position_ids, block_sequence_ids=block_sequence_ids)
            full_mask, sliding_mask = create_causal_mask, create_sliding_window_causal_mask
        masks = {}
        if "full_attention" in layer_types:
            masks["full_attention"] = full_mask(**mask_kwargs)
        if has_sliding_layers:
            masks["sliding_attention"] = sliding_mask(**mask_kwargs)
        return masks

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | list[torch.Tensor] | None = None,
        timesteps: torch.Tensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> Tuna2ModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Token ids; each image is a run of `image_token_id` of length 1 + its number of patches.
        pixel_values (`torch.Tensor` of shape `(num_images, num_channels, height, width)` or a list of
            `(num_channels, height, width)` tensors, *optional*):
            The images of the spans, sample-major, in [-1, 1].
        timesteps (`torch.Tensor` of shape `(num_images,)`, *optional*):
            Flow time of each image; t=1 (clean) by default.
        attention_mask (`torch.Tensor` of shape `(batch_size, past + sequence_length)`, *optional*):
            1 for tokens to attend to, 0 for padding. Position ids follow it when not given.

        Returns:
            [`Tuna2ModelOutputWithPast`].
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = self.default_position_ids(inputs_embeds, attention_mask, past_length)

        time_embeds = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, timesteps, return_dict=True)
            spans = self.image_spans(input_ids, inputs_embeds, image_features.image_grids)
            placeholder_mask = spans.is_image[..., None]
            image_embeds = image_features.last_hidden_state.to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(placeholder_mask, image_embeds)
            time_embeds = image_features.time_embeds
        else:
            spans = Tuna2ImageSpans.without_images(*inputs_embeds.shape[:2], inputs_embeds.device)
            has_image_tokens = input_ids is not None and not is_torchdynamo_compiling()
            if has_image_tokens and past_length == 0 and (input_ids == self.config.image_token_id).any():
                # As transformers' VLMs do (an assistant model's first pass in assisted decoding gets no images).
                logger.warning_once(
                    "the input ids hold image spans but no pixel_values were given: the image tokens are embedded "
                    "as text"
                )

        causal_mask_mapping = attention_mask
        if not isinstance(causal_mask_mapping, dict):
            causal_mask_mapping = self.create_attention_mask(inputs_embeds, attention_mask, cache, position_ids, spans)
            if spans.fill_each_row:
                # The mask, when there is one, is the padding alone; without one, sdpa must not fall back to causal.
                kwargs["is_causal"] = False

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=causal_mask_mapping,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return Tuna2ModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            time_embeds=time_embeds,
        )

    @staticmethod
    def default_position_ids(
        inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, past_length: int
    ) -> torch.LongTensor:
        """Positions counted over real tokens only, so that a left-padded prompt sees the positions it has alone."""
        length = inputs_embeds.shape[1]
        if attention_mask is None or attention_mask.ndim != 2:
            # `past_length` is a tensor for a static cache: added, not read, so that export can trace it.
            return (torch.arange(length, device=inputs_embeds.device) + past_length)[None]
        position_ids = attention_mask.long().cumsum(-1) - 1
        return position_ids.masked_fill(attention_mask == 0, 0)[:, -length:].to(inputs_embeds.device)


NO_FLOW_HEAD_ERROR = (
    "this model was loaded without its flow head (load_flow_head=False) and can only generate text; "
    "load it with load_flow_head=True to generate or edit images"
)


class Tuna2ForConditionalGeneration(Tuna2PreTrainedModel, GenerationMixin):
    """Tuna-2: understanding through the language-model head, generation and editing through the flow head.

    An understanding-only model, `from_pretrained(path, load_flow_head=False)`, has no flow head (`flow_head` is
    None). The option is a config attribute, so that the model's structure follows from its config alone (as
    `save_pretrained`, `from_config`, meta-device builds and `device_map` planning expect) and from_pretrained routes
    it to the config by itself; the flow-head keys are then listed in this instance's
    `_keys_to_ignore_on_load_unexpected`, so that transformers skips them (never read from disk) without warning.
    Asking such a model for an image raises a `ValueError` naming the option.
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # diffusers' block-level group offloading: the children it descends into (by name, at every level) to find the
    # decoder layers and flow-head blocks; the token embedding is its own group, since Tuna2Model calls it before
    # the language model's forward (which onloads the language model's other top-level modules).
    _group_offload_block_modules = ["model", "language_model", "flow_head", "embed_tokens"]

    def __init__(self, config: Tuna2Config):
        super().__init__(config)
        self.model = Tuna2Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.flow_head = Tuna2FlowHead(config) if config.load_flow_head else None
        if not config.load_flow_head:  # read by post_init, per instance: a full model of the class still warns
            self._keys_to_ignore_on_load_unexpected = [r"^flow_head\."]
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, inputs_embeds=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        # With a compilable cache, generate() builds generic causal masks, blind to the image spans; the prefill,
        # which holds them, builds its own from the padding mask (the decoding steps are text).
        if model_inputs.get("pixel_values") is not None and isinstance(model_inputs.get("attention_mask"), dict):
            model_inputs["attention_mask"] = attention_mask
        return model_inputs

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | list[torch.Tensor] | None = None,
        timesteps: torch.Tensor | None = None,
        image_roles: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> Tuna2CausalLMOutputWithPast:
        r"""
        One forward for every mode: the logits of understanding, the x0 of the images being generated, and the
        losses of training.

        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Token ids from [`Tuna2Processor`]; each image is a run of `<|image_pad|>` (time slot + patches).
        pixel_values (`torch.Tensor` of shape `(num_images, 3, height, width)`, or a list of `(3, height, width)`
            tensors, *optional*):
            The images of the spans in [-1, 1], sample-major: each at its flow time `timesteps` (the noisy `z_t` of
            an image being generated), or clean when the model noises them itself (training, below).
        timesteps (`torch.Tensor` of shape `(num_images,)`, *optional*):
            Flow time of each image (t=1 clean, the default).
        image_roles (`torch.LongTensor` of shape `(num_images,)`, *optional*):
            [`Tuna2ImageRole`] of each image. The flow head runs and `x0` holds the prediction of every `TARGET`
            image. In training mode, without `timesteps`, this is a training batch of clean images: `TARGET` images
            are noised to `z_t = t x + (1 - t) noise_scale eps` with `t = sigmoid(N(P_mean, P_std))` and supervised
            by the flow loss, and `UNDERSTANDING` images are lightly noised with `understanding_noise_prob`. In eval
            mode nothing is drawn: `TARGET` images need their `timesteps` (a `ValueError` otherwise).
        attention_mask (`torch.Tensor` of shape `(batch_size, past + sequence_length)`, *optional*):
            1 for tokens to attend to, 0 for padding (of the cached positions too).
        cache (`Cache`, *optional*):
            A [`Tuna2Cache`] extends the language model and the flow head together (generating an image after
            cached positions needs one); any other cache is the language model's, as in `generate()`.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets, -100 where ignored. The model shifts them. In training mode the LM head then runs on
            the labelled positions only (`logits` holds theirs); in eval mode on every position.
        shift_labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets already shifted (the label of position i is the token at i + 1), as sequence-parallel training
            passes them; they replace `labels`.
        logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
            Compute logits for the last `logits_to_keep` positions only (0: all), or for the given positions.
        num_items_in_batch (`int`, *optional*):
            Label count over the whole (accumulated) batch, to normalise the next-token loss.
        """
        clean_images = None
        if image_roles is not None:
            image_roles = torch.as_tensor(image_roles).reshape(-1).cpu()
            num_images = 0 if pixel_values is None else len(make_image_list(pixel_values))
            if image_roles.shape[0] != num_images:
                raise ValueError(f"got {image_roles.shape[0]} image roles for {num_images} images")
        targets = [] if image_roles is None else (image_roles == Tuna2ImageRole.TARGET).nonzero().flatten().tolist()
        if image_roles is not None and timesteps is None:
            if self.training:
                pixel_values, timesteps, clean_images = self.noise_images(pixel_values, image_roles)
            elif targets:
                raise ValueError(
                    "TARGET images need their `timesteps` in eval mode: the model draws the noise and the times of "
                    "a training batch in training mode only (`model.train()`)"
                )

        if (targets or isinstance(cache, Tuna2Cache)) and self.flow_head is None:
            raise ValueError(NO_FLOW_HEAD_ERROR)
        language_model_cache, flow_head_cache = cache, None
        if isinstance(cache, Tuna2Cache):
            language_model_cache, flow_head_cache = cache.language_model, cache.flow_head
        elif targets and cache is not None and cache.get_seq_length() > 0:
            raise ValueError("generating after cached positions needs a Tuna2Cache, with the flow head keys too")

        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            timesteps=timesteps,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=language_model_cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        lm_loss = None
        if labels is None and shift_labels is None:
            logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))
        else:
            if shift_labels is None:
                shift_labels = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            next_tokens = shift_labels.to(hidden_states.device)
            labelled = (next_tokens != -100).nonzero(as_tuple=True)  # (batch, position) indices
            next_tokens = next_tokens[labelled]
            if self.training:
                # The LM head runs on the labelled positions only: a generation sample has none, and its
                # vocabulary-wide logits (and their gradient) would be memory and time spent on nothing. With no
                # labelled position in the batch, the head still runs, on zero rows: it stays in the graph and gets a
                # zero gradient, so that DDP's reducer (even with find_unused_parameters=False) and gradient
                # accumulation see it every step. Selecting the rows reads their count on the host, once per step.
                logits = self.lm_head(hidden_states[labelled])
                labelled_logits = logits
            else:
                logits = self.lm_head(hidden_states)
                labelled_logits = logits[labelled]
            lm_loss = self.next_token_loss(labelled_logits, next_tokens, num_items_in_batch)
        x0 = None
        # A Tuna2Cache keeps the flow head's keys in step with the language model's, even where nothing is generated.
        if targets or flow_head_cache is not None:
            x0 = self.predict_x0(
                outputs.last_hidden_state,
                outputs.time_embeds,
                targets,
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=flow_head_cache,
                **kwargs,
            )

        loss = flow_loss = None
        if clean_images is not None or lm_loss is not None:
            if clean_images is not None and targets:
                flow_loss = self.flow_loss(x0, [clean_images[i] for i in targets], timesteps[targets])
            else:
                flow_loss = logits.new_zeros(())
            loss = self.config.flow_loss_weight * flow_loss
            if lm_loss is not None:
                loss = loss + self.config.lm_loss_weight * lm_loss
        return Tuna2CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=cache if flow_head_cache is not None else outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            x0=stack_if_same_size(x0) if targets else None,
            lm_loss=lm_loss,
            flow_loss=flow_loss,
        )

    def predict_x0(
        self,
        hidden_states: torch.Tensor,
        time_embeds: torch.Tensor | None,
        targets: list[int],
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> list[torch.Tensor]:
        """Runs the flow head on the language model's final `hidden_states` `(batch_size, seq_len, hidden_size)` and
        the images' `time_embeds` `(num_images, hidden_size)`, and returns the `(C, H, W)` x0 prediction of each image
        listed in `targets` (the time slot dropped, the patches un-patchified with `config.output_layout`). The other
        arguments are the model's inputs: the head reads the image spans, positions and attention mask from them as
        the language model did, over its own cache `cache` (which holds as many positions as the language
        model's did before this call)."""
        model = self.model
        if pixel_values is None:  # a text-only prefix: the head runs to extend its cache
            spans = Tuna2ImageSpans.without_images(*hidden_states.shape[:2], hidden_states.device)
            time_embeds = hidden_states.new_zeros(0, hidden_states.shape[-1])
        else:
            patch_size = self.config.patch_size
            grids = [(image.shape[-2] // patch_size, image.shape[-1] // patch_size) for image in pixel_values]
            spans = model.image_spans(input_ids, inputs_embeds, grids)
        if position_ids is None:
            past_length = cache.get_seq_length() if cache is not None else 0
            position_ids = model.default_position_ids(hidden_states, attention_mask, past_length)
        if isinstance(attention_mask, dict):
            attention_mask = attention_mask["full_attention"]
        else:
            attention_mask = model.create_attention_mask(
                hidden_states, attention_mask, cache, position_ids, spans, layer_types=("full_attention",)
            )["full_attention"]
            if spans.fill_each_row:
                kwargs["is_causal"] = False  # as in the language model
        head_output = self.flow_head(
            hidden_states,
            time_embeds,
            spans,
            position_ids,
            attention_mask,
            past_key_values=cache,
            **kwargs,
        )
        patch_outputs = head_output[spans.is_patch].split([h * w for h, w in spans.grids])
        patch_size, layout = self.config.patch_size, self.config.output_layout
        return [unpatchify(patch_outputs[i], spans.grids[i], patch_size, layout) for i in targets]

    def noise_images(
        self, pixel_values: torch.Tensor | list[torch.Tensor], image_roles: torch.LongTensor
    ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Training: draws the flow time of each image by role ([`~Tuna2ForConditionalGeneration.training_timesteps`])
        and noises it. Returns the noisy `pixel_values`, the times and the clean fp32 images."""
        t = self.training_timesteps(image_roles).to(self.device)
        clean = [image.to(self.device, torch.float32) for image in make_image_list(pixel_values)]
        noised = [noisy_image(x, torch.randn_like(x), t[i], self.config.noise_scale) for i, x in enumerate(clean)]
        return stack_if_same_size(noised), t, clean

    def training_timesteps(self, image_roles: torch.LongTensor) -> torch.Tensor:
        """t of each image: logit-normal for targets; 1 for conditions; 1, or with `understanding_noise_prob` in
        training mode `1 - U(0, understanding_noise_level)`, for understanding images."""
        config = self.config
        t = torch.ones(image_roles.shape[0])
        is_target = image_roles == Tuna2ImageRole.TARGET
        t[is_target] = sample_training_t(int(is_target.sum()), config.P_mean, config.P_std)
        if self.training:
            is_understanding = image_roles == Tuna2ImageRole.UNDERSTANDING
            noised = is_understanding & (torch.rand(image_roles.shape[0]) < config.understanding_noise_prob)
            t[noised] = 1 - torch.rand(int(noised.sum())) * config.understanding_noise_level
        return t

    def flow_loss(self, x0: list[torch.Tensor], clean: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        """JiT's v-loss: `sum_i w(t_i) ||x0_i - x_i||^2` over the target images, per pixel value, with `w` from
        [`v_loss_weight`]."""
        squared_error = sum(
            v_loss_weight(t_i, self.config.t_eps) * ((x0_i.float() - x_i) ** 2).sum()
            for x0_i, x_i, t_i in zip(x0, clean, t)
        )
        return squared_error / sum(x.numel() for x in clean)

    def next_token_loss(
        self,
        logits: torch.Tensor,
        next_tokens: torch.LongTensor,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of the `(num_labelled, vocab_size)` logits of the labelled positions against their
        `(num_labelled,)` next tokens, summed and divided by `num_items_in_batch` (the label count of the accumulated
        batch) or by `num_labelled`. 0 (not NaN) when nothing is labelled, still attached to the graph."""
        loss = nn.functional.cross_entropy(logits.float(), next_tokens, reduction="sum")
        if num_items_in_batch is None:
            return loss / max(next_tokens.numel(), 1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch


__all__ = [
    "Tuna2PreTrainedModel",
    "Tuna2Model",
    "Tuna2ForConditionalGeneration",
    "Tuna2Cache",
]
