"""Tuna-2 configuration: a Qwen2 language model, a pixel patch embedding (Tuna-2) or a SigLIP vision encoder (Tuna-R),
and an adaLN flow head."""

from enum import IntEnum

import torch
from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config, SiglipVisionConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

OUTPUT_LAYOUTS = ("raster", "patch")


class Tuna2ImageRole(IntEnum):
    """What an image of a sequence is for."""

    CONDITION = 0  # clean input (an edit source): t = 1
    UNDERSTANDING = 1  # image to answer about: t = 1, lightly noised in training with `understanding_noise_prob`
    TARGET = 2  # image to generate: the model predicts its x0 (in training, noised at a logit-normal t and supervised)


# The llama3 frequency scaling the official flow head applies to its 1-D text RoPE.
FLOW_HEAD_LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@strict
class Tuna2Config(PreTrainedConfig):
    r"""
    Configuration of [`Tuna2ForConditionalGeneration`]: Qwen2 reads text and raw image patches; a 16-block adaLN
    flow head turns the LLM's final hidden states of each image span into clean pixels (x-prediction).

    With a `vision_config`, the model is Tuna-R, the paper's encoder variant: a SigLIP vision encoder (truncated after
    `vision_feature_layer`, no head, no final LayerNorm) and a projector replace the patch embedding, on the same
    pixels (the noisy `z_t` of an image being generated, the clean image otherwise).

    Args:
        text_config (`Qwen2Config` or `dict`):
            The language model. Its `hidden_size` is also the width of the patch embedding and of the flow head.
        vision_config (`SiglipVisionConfig` or `dict`, *optional*):
            Tuna-R's SigLIP vision encoder, `None` for Tuna-2. Its `image_size` sets the size of the position table
            (`(image_size / patch_size)**2` rows, bicubically resampled for any other patch grid); its `patch_size`
            must be `patch_size`. Its `vision_use_head` is set to `False`: the model has no pooling head.
        vision_feature_layer (`int`, defaults to -2):
            Tuna-R: the encoder layer whose output the model reads, counted as Python indexes the
            `num_hidden_layers` layers (-2, the second-to-last, keeps 26 of SigLIP2 so400m's 27). The layers after it
            are not built.
        projector_norm_eps (`float`, defaults to 1e-6):
            Tuna-R: epsilon of the RMSNorm that starts the projector (RMSNorm, Linear, GELU, Linear) from the
            encoder's width to the LLM's.
        patch_size (`int`, defaults to 16):
            Side of the square pixel patches; image sides must be multiples of it.
        num_channels (`int`, defaults to 3):
            Image channels (raw RGB in [-1, 1]).
        patch_norm_eps (`float`, defaults to `torch.finfo(torch.float32).eps`):
            Epsilon of the RMSNorm after the patch convolution (the official code leaves torch's default).
        timestep_frequency_dim (`int`, defaults to 256):
            Size of the sinusoidal timestep features fed to the timestep MLP.
        flow_head_num_layers (`int`, defaults to 16):
            Number of adaLN-Zero transformer blocks of the flow head.
        flow_head_num_attention_heads (`int`, defaults to 56), flow_head_num_key_value_heads (`int`, defaults to 14),
        flow_head_head_dim (`int`, defaults to 64):
            Grouped-query attention shape of the flow head.
        flow_head_intermediate_size (`int`, defaults to 18944):
            MLP width of the flow-head blocks.
        flow_head_hidden_act (`str`, defaults to `"silu"`):
            Activation of the gated MLP of the flow head.
        flow_head_rms_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the two RMSNorms of each flow-head block.
        flow_head_qk_norm_eps (`float`, defaults to 1e-6):
            Epsilon of the per-head query/key RMSNorms.
        flow_head_final_norm_eps (`float`, defaults to 1e-6):
            Epsilon of the RMSNorm of the final layer.
        flow_head_rope_theta (`float`, defaults to 500000.0), flow_head_rope_scaling (`dict`):
            1-D RoPE of text positions inside the flow head (llama3 scaling by default).
        image_rope_theta (`float`, defaults to 10000.0), image_rope_sections (`list[int]`, defaults to [16, 24, 24]):
            3-D RoPE of patch positions inside the flow head: channels per (frame, row, column) axis.
        noise_scale (`float`, defaults to 2.0):
            Standard deviation of the noise at t=0: `z_t = t x + (1 - t) noise_scale eps` (t=1 is clean).
        t_eps (`float`, defaults to 0.05):
            Lower clamp of `1 - t` when converting an x0 prediction into a velocity.
        P_mean (`float`, defaults to -0.8), P_std (`float`, defaults to 0.8):
            Training time distribution `t = sigmoid(N(P_mean, P_std))`.
        use_mask_token (`bool`, defaults to `True`):
            Whether the model owns the learned mask token of masked image modelling (training only).
        mask_ratio_min (`float`, defaults to -0.7), mask_ratio_max (`float`, defaults to 0.3):
            Per image, a ratio `r ~ U(min, max)` of patch embeddings is replaced by the mask token when `r > 0`.
        understanding_noise_prob (`float`, defaults to 0.1), understanding_noise_level (`float`, defaults to 0.1):
            In training, understanding images get `t = 1 - U(0, level)` with this probability instead of t=1.
        lm_loss_weight (`float`, defaults to 1.0), flow_loss_weight (`float`, defaults to 1.0):
            Weights of the next-token and flow losses.
        image_token_id (`int`, defaults to 151655), vision_start_token_id (`int`, defaults to 151652),
        vision_end_token_id (`int`, defaults to 151653):
            `<|image_pad|>`, `<|vision_start|>` and `<|vision_end|>`. Every run of image-pad ids is one image span:
            a time slot followed by one slot per patch.
        output_layout (`str`, defaults to `"raster"`):
            How the flow head's `patch_size**2 * num_channels` outputs per token become pixels. `"raster"` is the
            official flattening (token k holds raster-order pixels `[k p^2, (k+1) p^2)`, channel fastest), needed
            for official weights; `"patch"` is the standard un-patchify (token k holds patch k), for new models.
        load_flow_head (`bool`, defaults to `True`):
            Whether the model has its flow head. `False` builds an understanding-only model: no flow head is created,
            `from_pretrained` leaves the `flow_head.*` weights of the checkpoint on disk (about 3.8B of the 7B
            model's 10.3B parameters), text generation is unchanged, and image generation raises a `ValueError`.
            Passed to `from_pretrained` like any config attribute:
            `AutoModelForImageTextToText.from_pretrained(path, load_flow_head=False)`. `save_pretrained` keeps it in
            the config, so a model saved without its flow head loads without it.
    """

    model_type = "tuna2"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=Qwen2Config),
        "vision_config": SubConfigSpec(config_class=SiglipVisionConfig, optional=True),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int = -2
    projector_norm_eps: float = 1e-6
    patch_size: int = 16
    num_channels: int = 3
    patch_norm_eps: float = float(torch.finfo(torch.float32).eps)
    timestep_frequency_dim: int = 256
    flow_head_num_layers: int = 16
    flow_head_num_attention_heads: int = 56
    flow_head_num_key_value_heads: int = 14
    flow_head_head_dim: int = 64
    flow_head_intermediate_size: int = 18944
    flow_head_hidden_act: str = "silu"
    flow_head_rms_norm_eps: float = 1e-5
    flow_head_qk_norm_eps: float = 1e-6
    flow_head_final_norm_eps: float = 1e-6
    flow_head_rope_theta: float = 500000.0
    flow_head_rope_scaling: dict | None = None
    image_rope_theta: float = 10000.0
    image_rope_sections: list[int] | None = None
    noise_scale: float = 2.0
    t_eps: float = 0.05
    P_mean: float = -0.8
    P_std: float = 0.8
    use_mask_token: bool = True
    mask_ratio_min: float = -0.7
    mask_ratio_max: float = 0.3
    understanding_noise_prob: float = 0.1
    understanding_noise_level: float = 0.1
    lm_loss_weight: float = 1.0
    flow_loss_weight: float = 1.0
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    output_layout: str = "raster"
    load_flow_head: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.flow_head_rope_scaling is None:
            self.flow_head_rope_scaling = dict(FLOW_HEAD_LLAMA3_ROPE_SCALING)
        if self.image_rope_sections is None:
            self.image_rope_sections = [16, 24, 24]
        self.check_flow_head_settings()
        super().__post_init__(**kwargs)
        if self.vision_config is not None:
            self.vision_config.vision_use_head = False  # the model reads patch features, never SigLIP's pooled output
            self.check_vision_settings()

    @property
    def num_vision_layers(self) -> int:
        """Tuna-R: the number of SigLIP encoder layers the model keeps (up to `vision_feature_layer`)."""
        if self.vision_feature_layer >= 0:
            return self.vision_feature_layer + 1
        return self.vision_config.num_hidden_layers + self.vision_feature_layer + 1

    def check_vision_settings(self):
        """Raises a `ValueError` naming the first setting of the vision encoder that does not fit the model."""
        vision = self.vision_config
        if vision.patch_size != self.patch_size or vision.num_channels != self.num_channels:
            raise ValueError(
                f"the vision encoder reads {vision.num_channels}-channel {vision.patch_size}-pixel patches, but the "
                f"flow head writes {self.num_channels}-channel {self.patch_size}-pixel patches: they must be the same"
            )
        if vision.image_size % vision.patch_size:
            raise ValueError(
                f"vision_config.image_size ({vision.image_size}) must be a multiple of its patch_size "
                f"({vision.patch_size})"
            )
        if not 1 <= self.num_vision_layers <= vision.num_hidden_layers:
            raise ValueError(
                f"vision_feature_layer {self.vision_feature_layer} is not a layer of the "
                f"{vision.num_hidden_layers}-layer vision encoder"
            )

    def check_flow_head_settings(self):
        """Raises a `ValueError` naming the first inconsistent setting."""
        if self.output_layout not in OUTPUT_LAYOUTS:
            raise ValueError(f"output_layout must be one of {OUTPUT_LAYOUTS}, got {self.output_layout!r}")
        if sum(self.image_rope_sections) != self.flow_head_head_dim or any(s % 2 for s in self.image_rope_sections):
            raise ValueError(
                f"image_rope_sections {self.image_rope_sections} must be even and sum to flow_head_head_dim "
                f"({self.flow_head_head_dim})"
            )
        if self.flow_head_num_attention_heads % self.flow_head_num_key_value_heads:
            raise ValueError(
                f"flow_head_num_attention_heads ({self.flow_head_num_attention_heads}) must be a multiple of "
                f"flow_head_num_key_value_heads ({self.flow_head_num_key_value_heads})"
            )
        if self.flow_head_rope_scaling.get("rope_type", "llama3") != "llama3":
            raise ValueError(
                f"flow_head_rope_scaling supports rope_type 'llama3' only, got {self.flow_head_rope_scaling}"
            )

    @classmethod
    def tuna2_7b(cls, **kwargs) -> "Tuna2Config":
        """The exact configuration of the official Tuna-2 7B (Qwen2.5-7B-Instruct with the vocabulary resized to
        151669 rows, and the 16-block flow head)."""
        text_config = Qwen2Config(
            vocab_size=151669,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False,
            bos_token_id=151643,
            eos_token_id=151645,
            pad_token_id=151665,
        )
        return cls(text_config=text_config, **kwargs)

    @classmethod
    def tuna_r_7b(cls, **kwargs) -> "Tuna2Config":
        """The exact configuration of the official Tuna-R 7B (`configs/model/tuna_2r_pixel_7b.yaml`): the Tuna-2 7B's
        LLM and flow head, with SigLIP2 so400m patch16 at 512 (a 32x32 position table) read at its second-to-last
        layer, and no mask token."""
        vision_config = SiglipVisionConfig(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=512,
            patch_size=16,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
            vision_use_head=False,
        )
        kwargs = {"vision_config": vision_config, "vision_feature_layer": -2, "use_mask_token": False, **kwargs}
        return cls.tuna2_7b(**kwargs)


__all__ = ["Tuna2Config", "Tuna2ImageRole"]
