"""Tuna2Pipeline: text-to-image generation and image editing with Tuna-2, on the weights of the transformers model.

Sampling follows the official JiT sampler (t=1 is clean): `z_0 = noise_scale * eps`, the linear grid
`t_i = i / num_inference_steps`, the model's x0 prediction guided on x0 and turned into the velocity
`v = (x0 - z) / max(1 - t, t_eps)`, Euler steps, and the final state (not the last x0) as the image.
"""

import contextlib
import inspect
import json
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.loaders.lora_base import (
    LORA_WEIGHT_NAME_SAFE,
    LoraBaseMixin,
    _fetch_state_dict,
    _func_optionally_disable_offloading,
)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import is_peft_available, logging
from diffusers.utils.peft_utils import _create_lora_config, get_adapter_name
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download

from transformers_tuna2 import Tuna2Cache, Tuna2ForConditionalGeneration, Tuna2ImageRole, Tuna2Processor
from transformers_tuna2.flow_matching import guided_x0, timestep_grid, velocity
from transformers_tuna2.processing_tuna2 import generation_length

from . import defaults

logger = logging.get_logger(__name__)

# The official default negative prompts (configs/predict/t2i.yaml and configs/predict/edit.yaml).
DEFAULT_NEGATIVE_PROMPT = (
    "ugly, oversaturated, distorted, deformed, disfigured, low quality, worst quality, blurry, noisy, unrealistic, "
    "pixelated, overexposed, harsh shadows, washed out, dull colors, unnatural contrast, bad lighting, uneven "
    "lighting, unnatural reflections, color banding, unrealistic textures, poor shading, fake details, plastic skin, "
    "waxy skin, unrealistic skin tone, color bleeding, jpeg artifacts, watermark, frame border, compression "
    "artifacts, low-res, low resolution, poor composition, off-centered, messy background, cluttered, cropped head, "
    "cut-off body, wrong perspective, out of frame, bad framing, tilted horizon, unnatural pose, broken limbs, bad "
    "anatomy, bad proportions, extra limbs, missing limbs, fused fingers, extra fingers, twisted arms, stiff pose, "
    "awkward expression, asymmetrical eyes, mismatched eyes, lopsided face, disfigured mouth, bad hands, poorly "
    "drawn hands, poorly drawn face, uncanny face, creepy smile, unnatural gaze, doll-like face, distorted face, "
    "mutated body, duplicated parts, multiple heads, extra body parts, text artifacts, signature, logo, cartoonish, "
    "3d render, cgi, unreal engine, low depth, flat lighting, wrong focus, out of focus, motion blur, vignette, HDR "
    "effect, oversharpened, bad exposure, grainy, bad color balance, unrealistic highlights, poor white balance, low "
    "dynamic range"
)
DEFAULT_EDIT_NEGATIVE_PROMPT = (
    "identity changed, different person, face altered, different facial features, lost subject, missing subject, "
    "replaced subject, drastic pose change, broken anatomy, extra limbs, missing limbs, distorted body, deformed "
    "face, hallucinated details, removed subject details, inconsistent lighting, mismatched style, oversaturated "
    "edit, unintended color shift, blurry, watermark, jpeg artifacts, text artifacts, low quality, worst quality, "
    "bad composition"
)
# The pipeline's sampling settings saved in `model_index.json`, with their official values.
OFFICIAL_SAMPLING = {
    "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
    "edit_negative_prompt": DEFAULT_EDIT_NEGATIVE_PROMPT,
    "guidance_scale": defaults.GUIDANCE_SCALE,
    "edit_guidance_scale": defaults.EDIT_GUIDANCE_SCALE,
}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# What `from_pretrained` hands to the hub download, and to the model's own loading.
HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
MODEL_LOADING_OPTIONS = ("use_safetensors", "device_map", "quantization_config", "low_cpu_mem_usage")
MODEL_INDEX = "model_index.json"
COMPONENTS = ("model", "processor", "scheduler")
PEFT_CONFIG_NAME = "adapter_config.json"


def lora_module(key: str) -> str | None:
    """The module a LoRA weight belongs to (`a.b.q_proj` for `a.b.q_proj.lora_A.weight`); None for a key that is not
    a LoRA weight."""
    module, sep, _ = key.partition(".lora_")
    return module if sep else None


def lora_layers_of(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], "peft.LoraConfig"]:  # noqa: F821
    """The PEFT state dict (module paths of the Tuna-2 model, no adapter name) and the config of the one active
    adapter of a `PeftModel` or of a model with adapters loaded through transformers' PEFT integration."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    names = model.active_adapters if isinstance(model, PeftModel) else model.active_adapters()
    if len(names) != 1:
        raise ValueError(f"the model has {len(names)} active adapters ({names}); activate one, or pass its state dict")
    layers = get_peft_model_state_dict(model, adapter_name=names[0])
    if isinstance(model, PeftModel):
        layers = {key.removeprefix("base_model.model."): value for key, value in layers.items()}
    return layers, model.peft_config[names[0]]


def load_adapter(model: Tuna2ForConditionalGeneration, adapter_name: str, *args, **kwargs):
    """`model.load_adapter(*args, adapter_name=..., **kwargs)` with a load report about this adapter only: with other
    adapters loaded, transformers' own report lists their weights as missing from this one's checkpoint."""
    from transformers.utils import logging as transformers_logging

    peft_logger = transformers_logging.get_logger("transformers.integrations.peft")
    level = peft_logger.level
    peft_logger.setLevel(transformers_logging.ERROR)
    try:
        info = model.load_adapter(*args, adapter_name=adapter_name, **kwargs)
    finally:
        peft_logger.setLevel(level)
    if info is None:
        return
    missing = sorted(key for key in info.missing_keys if f".{adapter_name}." in key)
    unexpected = sorted(info.unexpected_keys)
    for what, keys in (("left at their initial values", missing), ("not loaded", unexpected)):
        if keys:
            logger.warning(f"LoRA {adapter_name!r}: {len(keys)} weight(s) {what}: {', '.join(keys[:3])}")


@contextlib.contextmanager
def _lora_loading(pipeline):
    """Takes accelerate's offloading hooks off the pipeline while adapters are injected, and puts them back after, as
    diffusers' LoRA loaders do."""
    model_offload, sequential_offload, group_offload = _func_optionally_disable_offloading(pipeline)
    try:
        yield
    finally:
        if model_offload:
            pipeline.enable_model_cpu_offload()
        elif sequential_offload:
            pipeline.enable_sequential_cpu_offload()
        elif group_offload:
            from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading

            for component in pipeline.components.values():
                if isinstance(component, torch.nn.Module):
                    _maybe_remove_and_reapply_group_offloading(component)


# Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.retrieve_timesteps
def retrieve_timesteps(
    scheduler,
    num_inference_steps: int | None = None,
    device: str | torch.device | None = None,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
    **kwargs,
):
    r"""
    Calls the scheduler's `set_timesteps` method and retrieves timesteps from the scheduler after the call. Handles
    custom timesteps. Any kwargs will be supplied to `scheduler.set_timesteps`.

    Args:
        scheduler (`SchedulerMixin`):
            The scheduler to get timesteps from.
        num_inference_steps (`int`):
            The number of diffusion steps used when generating samples with a pre-trained model. If used, `timesteps`
            must be `None`.
        device (`str` or `torch.device`, *optional*):
            The device to which the timesteps should be moved to. If `None`, the timesteps are not moved.
        timesteps (`list[int]`, *optional*):
            Custom timesteps used to override the timestep spacing strategy of the scheduler. If `timesteps` is passed,
            `num_inference_steps` and `sigmas` must be `None`.
        sigmas (`list[float]`, *optional*):
            Custom sigmas used to override the timestep spacing strategy of the scheduler. If `sigmas` is passed,
            `num_inference_steps` and `timesteps` must be `None`.

    Returns:
        `tuple[torch.Tensor, int]`: A tuple where the first element is the timestep schedule from the scheduler and the
        second element is the number of inference steps.
    """
    if timesteps is not None and sigmas is not None:
        raise ValueError("Only one of `timesteps` or `sigmas` can be passed. Please choose one to set custom values")
    if timesteps is not None:
        accepts_timesteps = "timesteps" in set(inspect.signature(scheduler.set_timesteps).parameters.keys())
        if not accepts_timesteps:
            raise ValueError(
                f"The current scheduler class {scheduler.__class__}'s `set_timesteps` does not support custom"
                f" timestep schedules. Please check whether you are using the correct scheduler."
            )
        scheduler.set_timesteps(timesteps=timesteps, device=device, **kwargs)
        timesteps = scheduler.timesteps
        num_inference_steps = len(timesteps)
    elif sigmas is not None:
        accept_sigmas = "sigmas" in set(inspect.signature(scheduler.set_timesteps).parameters.keys())
        if not accept_sigmas:
            raise ValueError(
                f"The current scheduler class {scheduler.__class__}'s `set_timesteps` does not support custom"
                f" sigmas schedules. Please check whether you are using the correct scheduler."
            )
        scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
        timesteps = scheduler.timesteps
        num_inference_steps = len(timesteps)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
        timesteps = scheduler.timesteps
    return timesteps, num_inference_steps


@dataclass
class Tuna2EncodedPrompt:
    """What every denoising step feeds the model ([`Tuna2Pipeline.encode_prompt`]).

    Attributes:
        input_ids (`torch.LongTensor` of shape `(batch_size, length)`): the generated image's span after a cached
            prefix, else the whole sequences (conditional rows, then the negative ones).
        attention_mask (`torch.LongTensor` of shape `(batch_size, prefix_length + length)`): padding mask of the
            prefix and of `input_ids`.
        image_roles (`torch.LongTensor` of shape `(num_images,)`): roles of the images of `input_ids`, sample-major:
            `TARGET` for each image being generated, `CONDITION` for an edit source.
        condition_pixel_values (`torch.Tensor` of shape `(num_conditions, 3, height, width)`, *optional*): the clean
            edit sources of `input_ids`.
        past_key_values ([`Tuna2Cache`], *optional*): the prefix's keys and values, cut back to the prefix after
            every step.
    """

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    image_roles: torch.LongTensor
    condition_pixel_values: torch.Tensor | None = None
    past_key_values: Tuna2Cache | None = None


class Tuna2Pipeline(DiffusionPipeline, LoraBaseMixin):
    r"""
    Text-to-image generation and image editing with Tuna-2.

    Args:
        model ([`Tuna2ForConditionalGeneration`]): the Tuna-2 model (shared with understanding; not copied).
        processor ([`Tuna2Processor`]): owns the sequence layout.
        scheduler ([`SchedulerMixin`], *optional*): a flow-matching scheduler working in sigma = 1 - t;
            [`FlowMatchEulerDiscreteScheduler`] (the default) reproduces the official sampler.
        negative_prompt (`str`, *optional*), edit_negative_prompt (`str`, *optional*): the checkpoint's default
            negative prompts for text-to-image and editing (saved in `model_index.json`). A model trained with
            caption dropout uses `""`.
        guidance_scale (`float`, *optional*), edit_guidance_scale (`float`, *optional*): the checkpoint's default
            CFG scales for text-to-image and editing (saved in `model_index.json`).

        Any of these not given is the one saved in the `model_index.json` of the folder the model (or the processor)
        was loaded from, else the official value (the official negative prompts, 3.0 and 2.0).
    """

    model_cpu_offload_seq = "model"
    # Left out, the default scheduler is built in `__init__`; listed, it is a component like the others (diffusers
    # leaves optional `__init__` arguments out of `components` unless they are listed here).
    _optional_components = ["scheduler"]
    _callback_tensor_inputs = ["latents"]
    # LoRA (diffusers' `LoraBaseMixin`): the model is the one component that takes adapters; the keys of a
    # diffusers-format LoRA file start with its name, as `transformer.` in the transformer pipelines.
    _lora_loadable_modules = ["model"]
    model_name = "model"

    def __init__(
        self,
        model: Tuna2ForConditionalGeneration,
        processor: Tuna2Processor,
        scheduler: SchedulerMixin | None = None,
        negative_prompt: str | None = None,
        edit_negative_prompt: str | None = None,
        guidance_scale: float | None = None,
        edit_guidance_scale: float | None = None,
    ):
        super().__init__()
        self.register_modules(
            model=model, processor=processor, scheduler=scheduler or FlowMatchEulerDiscreteScheduler()
        )
        given = {
            "negative_prompt": negative_prompt,
            "edit_negative_prompt": edit_negative_prompt,
            "guidance_scale": guidance_scale,
            "edit_guidance_scale": edit_guidance_scale,
        }
        # Not given: the sampling defaults saved with the checkpoint the model (or processor) was loaded from, else
        # the official ones.
        saved = self.sampling_defaults_of(model, processor) if None in given.values() else {}
        self.register_to_config(
            **{key: saved.get(key, OFFICIAL_SAMPLING[key]) if value is None else value for key, value in given.items()}
        )

    # ------------------------------------------------------------------------------------------------ saving/loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "Tuna2Pipeline":
        """Loads the folder that `AutoModelForImageTextToText` loads (a hub id is downloaded first). With its
        `model_index.json`, through diffusers' loader: the model and processor from the folder's root, the scheduler
        from `scheduler/`, with diffusers' options (`variant`, `use_safetensors`, `torch_dtype` or `dtype` as a dtype
        or a dict of dtypes by component name with a `"default"`, `device_map`, ...). A folder written by
        transformers alone (no `model_index.json`) gets the default scheduler and sampling settings."""
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            hub_options = {key: kwargs.pop(key) for key in HUB_OPTIONS if key in kwargs}
            path = Path(snapshot_download(str(pretrained_model_name_or_path), **hub_options))
        if "torch_dtype" in kwargs:
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        model_dtype = kwargs.get("dtype")
        if isinstance(model_dtype, dict):
            model_dtype = cls.model_dtype(model_dtype)
        variant = kwargs.get("variant")
        # transformers would raise an OSError about a missing file; diffusers names the variant.
        if variant is not None and not any(path.glob(f"*model.{variant}[.-]*")):
            raise ValueError(f"no model weights of `variant={variant!r}` in {path}")
        if (path / MODEL_INDEX).is_file():
            if variant is not None:  # diffusers looks for variants in component subfolders; the model is at the root
                model_options = {key: kwargs.pop(key) for key in MODEL_LOADING_OPTIONS if key in kwargs}
                kwargs["model"] = Tuna2ForConditionalGeneration.from_pretrained(
                    path, variant=kwargs.pop("variant"), dtype=model_dtype, **model_options
                )
            return super().from_pretrained(path, **kwargs)
        kwargs.pop("dtype", None)
        pipeline_options = {
            key: kwargs.pop(key) for key in inspect.signature(cls.__init__).parameters if key in kwargs
        }
        processor = pipeline_options.pop("processor", None) or Tuna2Processor.from_pretrained(path)
        model = pipeline_options.pop("model", None) or Tuna2ForConditionalGeneration.from_pretrained(
            path, dtype=model_dtype, **kwargs
        )
        return cls(model=model, processor=processor, **pipeline_options)

    @staticmethod
    def model_dtype(dtypes: dict[str, torch.dtype]) -> torch.dtype:
        """The model's dtype in a per-component dtype dict (the model is the only component with weights); a key
        naming no component raises rather than being ignored."""
        unknown = sorted(set(dtypes) - {*COMPONENTS, "default"})
        if unknown:
            raise ValueError(
                f"`dtype` has no component named {unknown[0]!r}; the components are {', '.join(COMPONENTS)}"
            )
        return dtypes.get("model", dtypes.get("default", torch.float32))

    @staticmethod
    def sampling_defaults(path: str | os.PathLike) -> dict:
        """The default negative prompts and guidance scales a checkpoint folder's `model_index.json` sets, if any."""
        index_file = Path(path) / MODEL_INDEX
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
        return {key: index[key] for key in OFFICIAL_SAMPLING if key in index}

    @classmethod
    def sampling_defaults_of(cls, model, processor) -> dict:
        """The sampling defaults saved in the local folder the model was loaded from, else in the processor's (its
        tokenizer's `name_or_path`); empty when neither folder has a `model_index.json`."""
        tokenizer = getattr(processor, "tokenizer", None)
        for source in (getattr(model, "name_or_path", None), getattr(tokenizer, "name_or_path", None)):
            if source and Path(source).is_dir():
                saved = cls.sampling_defaults(source)
                if saved:
                    return saved
        return {}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Writes one folder for both libraries: the model (one copy of the weights), processor and tokenizer at the
        root, the scheduler in `scheduler/`, and `model_index.json`."""
        save_directory = Path(save_directory)
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)
        self.save_scheduler_and_index(save_directory)

    def save_scheduler_and_index(self, save_directory: str | os.PathLike):
        """Writes what the pipeline adds to a transformers checkpoint folder: `scheduler/` and `model_index.json`.
        `tuna2 convert` and `tuna2 init` (`diffusers_tuna2.conversion`) use it after the transformers converters."""
        save_directory = Path(save_directory)
        self.scheduler.save_pretrained(save_directory / "scheduler")
        index = json.loads(self.to_json_string())
        index.pop("_name_or_path", None)  # where a loaded pipeline came from, not a fact of the saved folder
        (save_directory / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------------------------------------ LoRA

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict, **kwargs):
        """The LoRA state dict of a diffusers-format file (`pytorch_lora_weights.safetensors` in a folder or hub
        repo, or `weight_name`), or of a dict, read by diffusers' own `_fetch_state_dict`: keys
        `model.<module>.lora_A.weight` and `...lora_B.weight`. With `return_lora_metadata=True`, also the LoRA
        config the file's metadata carries (its keys prefixed with `model.` too; `None` when absent)."""
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        use_safetensors = kwargs.pop("use_safetensors", None)
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=kwargs.pop("weight_name", None),
            use_safetensors=True if use_safetensors is None else use_safetensors,
            local_files_only=kwargs.pop("local_files_only", None),
            cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False),
            proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None),
            revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=use_safetensors is None,
        )
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ):
        """Loads a LoRA into the model, as diffusers pipelines do: a diffusers-format file
        (`pytorch_lora_weights.safetensors`, what `save_lora_weights` and `examples/sft.py` write; a folder, hub repo,
        `weight_name` or state dict), else a PEFT adapter folder (`adapter_config.json`, through the model's
        `load_adapter`). `adapter_name` defaults to diffusers' `default_<n>`. Keys that match no module of the model
        raise a `ValueError` naming them. The other keyword arguments are those of `lora_state_dict`."""
        if not is_peft_available():
            raise ValueError("loading a LoRA needs PEFT: pip install peft (or the `train` extra)")
        if adapter_name is None:
            adapter_name = get_adapter_name(self.model)
        if self.is_peft_adapter(pretrained_model_name_or_path_or_dict, kwargs.get("weight_name")):
            with _lora_loading(self):
                load_adapter(self.model, adapter_name, str(pretrained_model_name_or_path_or_dict))
            return
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        self.load_lora_into_model(
            state_dict, self.model, adapter_name=adapter_name, metadata=metadata, _pipeline=self, hotswap=hotswap
        )

    @staticmethod
    def is_peft_adapter(pretrained_model_name_or_path_or_dict, weight_name: str | None = None) -> bool:
        """Whether `load_lora_weights` reads a PEFT adapter folder: one with `adapter_config.json` and without a
        diffusers-format `pytorch_lora_weights.safetensors` (the diffusers file wins when a folder has both)."""
        if isinstance(pretrained_model_name_or_path_or_dict, dict) or weight_name is not None:
            return False
        path = Path(pretrained_model_name_or_path_or_dict)
        if path.is_dir():
            return (path / PEFT_CONFIG_NAME).is_file() and not (path / LORA_WEIGHT_NAME_SAFE).is_file()
        if path.is_file():
            return False
        from huggingface_hub import file_exists

        repo = str(pretrained_model_name_or_path_or_dict)
        return file_exists(repo, PEFT_CONFIG_NAME) and not file_exists(repo, LORA_WEIGHT_NAME_SAFE)

    @classmethod
    def load_lora_into_model(
        cls,
        state_dict: dict[str, torch.Tensor],
        model: Tuna2ForConditionalGeneration,
        adapter_name: str | None = None,
        metadata: dict | None = None,
        _pipeline=None,
        hotswap: bool = False,
        low_cpu_mem_usage: bool = False,
    ):
        """Injects a diffusers-format LoRA state dict (keys `model.<module>.lora_A.weight`) into `model` through
        transformers' PEFT integration (`load_adapter` with the state dict and its `LoraConfig`). The config is the
        file's metadata when it has one, else diffusers' `get_peft_kwargs` guess (rank from the weights,
        `lora_alpha = r`)."""
        prefix = f"{cls.model_name}."
        modules = {name for name, _ in model.named_modules()}
        unknown = [
            key for key in state_dict if not key.startswith(prefix) or lora_module(key[len(prefix) :]) not in modules
        ]
        if unknown:
            shown = ", ".join(unknown[:3]) + (f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else "")
            raise ValueError(
                f"{len(unknown)} LoRA key(s) match no module of the model (expected {prefix}<module>.lora_A.weight "
                f"or .lora_B.weight): {shown}"
            )
        state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
        if metadata is not None:
            metadata = {key[len(prefix) :]: value for key, value in metadata.items() if key.startswith(prefix)}
        ranks = {key: value.shape[1] for key, value in state_dict.items() if key.endswith("lora_B.weight")}
        lora_config = _create_lora_config(state_dict, None, metadata or None, ranks, is_unet=False)
        if adapter_name is None:
            adapter_name = get_adapter_name(model)
        with _lora_loading(_pipeline):
            load_adapter(
                model,
                adapter_name,
                adapter_state_dict=state_dict,
                peft_config=lora_config,
                hotswap=hotswap,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        model_lora_layers: dict[str, torch.Tensor] | torch.nn.Module | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        model_lora_adapter_metadata: dict | None = None,
    ):
        """Writes a LoRA in the diffusers format, as diffusers pipelines write theirs
        (`LoraBaseMixin._save_lora_weights`): `pytorch_lora_weights.safetensors` with keys
        `model.<module>.lora_A.weight`, and the LoRA config, its keys prefixed with `model.`, as JSON under
        `lora_adapter_metadata` in the safetensors metadata.

        `model_lora_layers` is the adapter's PEFT state dict (`get_peft_model_state_dict(model)`, module paths of
        [`Tuna2ForConditionalGeneration`]), with `model_lora_adapter_metadata` its `LoraConfig.to_dict()`; or a model
        carrying an adapter (a `PeftModel`, or the pipeline's model after `load_lora_weights`), whose active adapter
        and config are written."""
        if isinstance(model_lora_layers, torch.nn.Module):
            model_lora_layers, config = lora_layers_of(model_lora_layers)
            if model_lora_adapter_metadata is None:
                model_lora_adapter_metadata = config.to_dict()
        if not model_lora_layers:
            raise ValueError("You must pass `model_lora_layers`.")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.model_name: model_lora_layers},
            lora_metadata={cls.model_name: model_lora_adapter_metadata},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ):
        """Merges the active adapters (or `adapter_names`), scaled by `lora_scale`, into the model's weights
        (diffusers' `LoraBaseMixin.fuse_lora` on the `model` component)."""
        super().fuse_lora(
            components=components or ["model"],
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs):
        """Takes the fused adapters back out of the model's weights."""
        super().unfuse_lora(components=components or ["model"], **kwargs)

    # ------------------------------------------------------------------------------------------------ properties

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """`(height, width)` of the images a call draws: the given sides, else the processor's fixed size if it has
        one, else `defaults.IMAGE_SIZE` square."""
        fixed = self.processor.image_processor.size or {"height": defaults.IMAGE_SIZE, "width": defaults.IMAGE_SIZE}
        return (height if height is not None else fixed["height"], width if width is not None else fixed["width"])

    def model_is_checkpointing(self) -> bool:
        """Whether the model recomputes activations in backward (transformers >= 5.23 names it activation
        checkpointing)."""
        checkpointing = getattr(self.model, "is_activation_checkpointing", None)
        return bool(self.model.is_gradient_checkpointing if checkpointing is None else checkpointing)

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale != 1.0

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # ------------------------------------------------------------------------------------------------ steps

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        image,
        height,
        width,
        num_inference_steps,
        guidance_scale,
        num_images_per_prompt,
        generator,
        output_type,
        callback_on_step_end_tensor_inputs,
    ):
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)):
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if len(prompts) == 0:
            raise ValueError("`prompt` is an empty list")
        if isinstance(negative_prompt, list) and len(negative_prompt) != len(prompts):
            raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {len(prompts)}")
        if image is not None:
            images = image if isinstance(image, list) else [image]
            for item in images:
                if not isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike)):
                    raise ValueError(
                        f"`image` must be a PIL image, a numpy array, a tensor, a path or a URL (or a list of them), "
                        f"got {type(item).__name__}"
                    )
            if len(images) not in (1, len(prompts)):
                raise ValueError(f"got {len(images)} images to edit for {len(prompts)} prompts")
        patch_size = self.model.config.patch_size
        if height <= 0 or width <= 0 or height % patch_size or width % patch_size:
            raise ValueError(
                f"height and width must be positive multiples of the patch size {patch_size}, got {height}x{width}"
            )
        needed = generation_length(self.processor.num_span_slots(height, width), editing=image is not None)
        max_positions = self.model.config.text_config.max_position_embeddings
        if needed > max_positions:
            raise ValueError(
                f"a {height}x{width} image needs at least {needed} positions, past the model's "
                f"max_position_embeddings ({max_positions})"
            )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps}")
        # A string from a config or a command line would otherwise fail deep in the sampling loop, NaN silently.
        if (
            not isinstance(guidance_scale, numbers.Real)
            or isinstance(guidance_scale, bool)
            or not math.isfinite(guidance_scale)
            or guidance_scale < 0
        ):
            raise ValueError(f"`guidance_scale` must be >= 0 and a finite number, got {guidance_scale!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {num_images_per_prompt}")
        total = len(prompts) * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"got {len(generator)} generators for {total} images (prompts x num_images_per_prompt)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback tensor inputs must be among {self._callback_tensor_inputs}, got {unknown}")

    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        images: list | None = None,
        device: torch.device | None = None,
        use_prefix_cache: bool = True,
    ) -> Tuna2EncodedPrompt:
        """Tokenizes the conditional sequences, then the negative ones (given for classifier-free guidance only),
        for `height x width` images (the pipeline's default size when not given); `images` are the sources of edits,
        one per prompt. With `use_prefix_cache`, the fixed prefix (prompt, and source image when editing) runs once
        through the model into a [`Tuna2Cache`]; every denoising step then feeds only the span of the image being
        generated."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negative_prompts = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        height, width = self.image_size(height, width)
        device = device if device is not None else self._execution_device
        texts = prompts + (negative_prompts or [])
        sources = (images * (2 if negative_prompts else 1)) if images is not None else None
        max_length = self.model.config.text_config.max_position_embeddings
        inputs = self.processor.generation_inputs(texts, height, width, source_images=sources, max_length=max_length)
        conditions = inputs["pixel_values"].to(device) if sources is not None else None
        prefix_ids, prefix_mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
        span_ids = inputs["span_ids"].to(device)
        if not use_prefix_cache:
            input_ids = torch.cat([prefix_ids, span_ids, inputs["suffix_ids"].to(device)], dim=1)
            attention_mask = torch.cat([prefix_mask, torch.ones_like(input_ids[:, prefix_ids.shape[1] :])], dim=1)
            return Tuna2EncodedPrompt(input_ids, attention_mask, inputs["image_roles"], conditions)
        cache = Tuna2Cache(config=self.model.config)
        self.model(
            input_ids=prefix_ids,
            attention_mask=prefix_mask,
            pixel_values=conditions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return Tuna2EncodedPrompt(
            input_ids=span_ids,
            attention_mask=torch.cat([prefix_mask, torch.ones_like(span_ids)], dim=1),
            image_roles=inputs["image_roles"][inputs["image_roles"] == Tuna2ImageRole.TARGET],
            past_key_values=cache,
        )

    def prepare_latents(self, num_images, height, width, dtype, device, generator, latents=None) -> torch.Tensor:
        """`z = noise_scale * eps`, eps drawn image by image in fp32 (on the generator's device, the CPU by
        default, as the official sampler), so that an image's noise does not depend on the rest of the batch."""
        shape = (num_images, self.model.config.num_channels, height, width)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
            return latents.to(device=device, dtype=dtype)
        generators = generator if isinstance(generator, list) else [generator] * num_images
        eps = torch.cat(
            [
                randn_tensor(
                    (1, *shape[1:]), generator=g, device=g.device if g is not None else "cpu", dtype=torch.float32
                )
                for g in generators
            ]
        )
        return (self.model.config.noise_scale * eps).to(device=device, dtype=dtype)

    def step_inputs(self, prompt_inputs: Tuna2EncodedPrompt, states: torch.Tensor, t: torch.Tensor) -> dict:
        """The model's inputs at one step: the images being generated at their state `z_t`, any edit source clean."""
        is_target = prompt_inputs.image_roles == Tuna2ImageRole.TARGET
        pixel_values = states.new_empty((len(is_target), *states.shape[1:]))
        pixel_values[is_target.to(states.device)] = states
        if prompt_inputs.condition_pixel_values is not None:
            pixel_values[~is_target.to(states.device)] = prompt_inputs.condition_pixel_values.to(states.dtype)
        return {
            "input_ids": prompt_inputs.input_ids,
            "attention_mask": prompt_inputs.attention_mask,
            "pixel_values": pixel_values,
            "timesteps": torch.where(is_target.to(t.device), t, 1.0),
            "image_roles": prompt_inputs.image_roles,
            "cache": prompt_inputs.past_key_values,
        }

    def guidance_scale_at(self, t: torch.Tensor) -> float:
        """The CFG scale at time t: the pipeline's inside `cfg_interval` (official rule), 1 outside."""
        low, high = self._cfg_interval
        return self.guidance_scale if t < high and (low == 0 or t > low) else 1.0

    def sigmas(self, num_inference_steps: int, dtype: torch.dtype) -> list[float] | None:
        """The official grid as sigmas (sigma = 1 - t) when the scheduler takes custom sigmas, else None (the
        scheduler's own grid)."""
        if "sigmas" not in inspect.signature(self.scheduler.set_timesteps).parameters:
            return None
        return (1 - timestep_grid(num_inference_steps, dtype)[:-1].float()).tolist()

    # ------------------------------------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image=None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = defaults.NUM_INFERENCE_STEPS,
        guidance_scale: float | None = None,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        use_prefix_cache: bool = True,
    ):
        r"""
        Args:
            prompt (`str` or `list[str]`): what to draw, or the editing instruction. `""` is allowed.
            image (PIL image, `np.ndarray`, `torch.Tensor`, a file path or URL, or a list, *optional*): image(s) to
                edit (one for all prompts, or one per prompt); arrays are `(H, W, 3)`, tensors `(3, H, W)`, uint8 or
                float in [0, 1].
                Each is resized to cover `height x width` and center-cropped, and enters clean (t=1).
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional branch; defaults to the pipeline's
                `negative_prompt` or `edit_negative_prompt` (the official ones unless the checkpoint says otherwise).
                `""` gives the empty unconditional prompt.
            height, width (`int`, *optional*): any multiples of the patch size (buckets: 512x512, 448x576, ...);
                default to the processor's fixed size if it has one, else 512.
            num_inference_steps (`int`, defaults to 50): Euler steps.
            guidance_scale (`float`, *optional*): CFG on x0; defaults to the pipeline's `guidance_scale` or
                `edit_guidance_scale` (officially 3.0 and 2.0); 1.0 turns it off.
            cfg_interval (`tuple[float, float]`, defaults to `(0.0, 1.0)`): CFG applies when
                `t < high and (low == 0 or t > low)` (official rule); elsewhere the conditional x0 is used.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or a list, one per image): seeds the initial noise.
            latents (`torch.Tensor`, *optional*): initial state `z_0` of shape `(num_images, 3, height, width)`.
            output_type (`str`, defaults to `"pil"`): `"pil"` or `"np"` (uint8 with the official conversion
                `uint8(clamp((z + 1) / 2, 0, 1) * 255)`), `"pt"` (float `(N, 3, H, W)` in [0, 1]), `"latent"` (the
                final state z in [-1, 1] pixel space).
            return_dict (`bool`, defaults to `True`): return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): `callback(pipe, step, timestep, callback_kwargs)` after
                each step; it may return `{"latents": ...}` to replace the state.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): tensors passed to it.
            use_prefix_cache (`bool`, defaults to `True`): run the prompt (and edit source) once and only the image
                span at each step; `False` recomputes whole sequences at each step, like the official pipeline.
        """
        if self.model.training and use_prefix_cache and self.model_is_checkpointing():
            raise ValueError(
                "the model is in training mode with gradient checkpointing, which turns its KV cache off (as "
                "Trainer.train() leaves it): call pipe.model.eval() before sampling"
            )
        if self.model.training:
            logger.warning(
                "the model is in training mode: masked image modelling and dropout change its predictions; call "
                "pipe.model.eval() before sampling"
            )
        editing = image is not None
        height, width = self.image_size(height, width)
        if guidance_scale is None:
            guidance_scale = self.config.edit_guidance_scale if editing else self.config.guidance_scale
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        self.check_inputs(
            prompt,
            negative_prompt,
            image,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            generator,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._cfg_interval = cfg_interval
        self._interrupt = False
        device = self._execution_device
        dtype = self.model.dtype

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            negative_prompt = self.config.edit_negative_prompt if editing else self.config.negative_prompt
        negative_prompts = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        images = None
        if editing:
            images = image if isinstance(image, list) else [image]
            images = images * len(prompts) if len(images) == 1 else images
            images = [item for item in images for _ in range(num_images_per_prompt)]
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negative_prompts = [p for p in negative_prompts for _ in range(num_images_per_prompt)]

        prompt_inputs = self.encode_prompt(
            prompts,
            negative_prompts if self.do_classifier_free_guidance else None,
            height,
            width,
            images,
            device,
            use_prefix_cache,
        )
        latents = self.prepare_latents(len(prompts), height, width, dtype, device, generator, latents)
        sigmas = self.sigmas(num_inference_steps, dtype)
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas)
        self._num_timesteps = len(timesteps)
        num_train_timesteps = self.scheduler.config.num_train_timesteps

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, timestep in enumerate(timesteps):
                if self.interrupt:
                    continue
                t = 1 - timestep.float() / num_train_timesteps
                states = torch.cat([latents, latents]) if self.do_classifier_free_guidance else latents
                # One row of logits, which denoising does not read.
                x0 = self.model(**self.step_inputs(prompt_inputs, states, t), logits_to_keep=1).x0
                if prompt_inputs.past_key_values is not None:
                    prompt_inputs.past_key_values.crop(-prompt_inputs.input_ids.shape[1])
                if self.do_classifier_free_guidance:
                    x0_cond, x0_uncond = x0.chunk(2)
                    x0 = guided_x0(x0_cond, x0_uncond, self.guidance_scale_at(t))
                # The scheduler integrates in sigma = 1 - t, so its model output is dz/dsigma = -v.
                model_output = -velocity(x0, latents, t, self.model.config.t_eps)
                latents = self.scheduler.step(model_output, timestep, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, i, timestep, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        if output_type == "latent":
            output = latents
        elif output_type == "pt":
            output = ((latents.float() + 1) / 2).clamp(0, 1)
        else:
            output = self.processor.image_processor.postprocess(latents, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output,)
        return ImagePipelineOutput(images=output)


__all__ = ["Tuna2EncodedPrompt", "Tuna2Pipeline"]
