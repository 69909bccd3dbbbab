"""Tuna2Pipeline: text-to-image generation and image editing with Tuna-2, on the weights of the transformers model.

Sampling follows the official JiT sampler (t=1 is clean): `z_0 = noise_scale * eps`, the linear grid
`t_i = i / num_inference_steps`, the model's x0 prediction guided on x0 and turned into the velocity
`v = (x0 - z) / max(1 - t, t_eps)`, Euler steps (or the official Heun steps), and the final state (not the last x0)
as the image.

The same pipeline serves Tuna-R (a model whose config has a `vision_config`), with the official Tuna-R pipeline's
differences: heun sampling and guidance 4 (text-to-image) and 5 (editing) by default, and the final state min-max
rescaled to [-1, 1] before the uint8 conversion.
"""

import inspect
import json
import math
import numbers
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.dynamic_modules_utils import get_relative_import_files
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo, list_repo_files, snapshot_download, upload_folder
from transformers.dynamic_module_utils import custom_object_save

from transformers_tuna2 import Tuna2Cache, Tuna2ForConditionalGeneration, Tuna2ImageRole, Tuna2Processor
from transformers_tuna2.flow_matching import guided_x0, timestep_grid, velocity
from transformers_tuna2.processing_tuna2 import generation_length

from .defaults import (
    EDIT_GUIDANCE_SCALE,
    GUIDANCE_SCALE,
    IMAGE_SIZE,
    NUM_INFERENCE_STEPS,
    SAMPLING_METHOD,
    TUNA_R_EDIT_GUIDANCE_SCALE,
    TUNA_R_GUIDANCE_SCALE,
    TUNA_R_SAMPLING_METHOD,
)
from .lora_tuna2 import Tuna2LoraLoaderMixin

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
# The pipeline's sampling settings saved in `model_index.json`, with their official values for Tuna-2.
OFFICIAL_SAMPLING = {
    "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
    "edit_negative_prompt": DEFAULT_EDIT_NEGATIVE_PROMPT,
    "guidance_scale": GUIDANCE_SCALE,
    "edit_guidance_scale": EDIT_GUIDANCE_SCALE,
    "sampling_method": SAMPLING_METHOD,
}
# What the official Tuna-R ("siglip_pixel") sets differently (scripts/launch/predict.sh); the same negative prompts.
OFFICIAL_TUNA_R_SAMPLING = {
    **OFFICIAL_SAMPLING,
    "guidance_scale": TUNA_R_GUIDANCE_SCALE,
    "edit_guidance_scale": TUNA_R_EDIT_GUIDANCE_SCALE,
    "sampling_method": TUNA_R_SAMPLING_METHOD,
}
SAMPLING_METHODS = ("euler", "heun")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# `save_pretrained(..., save_pipeline_code=True)` writes this module into the folder, where `model_index.json`'s
# `_class_name` names it as `[module, class]` (diffusers' mechanism for pipelines outside its namespace), with the
# modules it imports from this package. Its imports of the model's package become imports of the model's code that
# transformers saves beside the weights, so that the folder loads where only diffusers and transformers are.
PIPELINE_MODULE = "pipeline_tuna2"
PIPELINE_HELPERS = ("defaults.py", "lora_tuna2.py")
MODEL_CODE = (
    "configuration_tuna2.py",
    "image_processing_tuna2.py",
    "modeling_tuna2.py",
    "processing_tuna2.py",
    "flow_matching.py",
)
FIRST_PACKAGE_IMPORT = (
    "from transformers_tuna2 import Tuna2Cache, Tuna2ForConditionalGeneration, Tuna2ImageRole, Tuna2Processor\n"
)
FOLDER_IMPORTS = {
    FIRST_PACKAGE_IMPORT: (
        "from transformers import AutoImageProcessor\n\n"
        "from .configuration_tuna2 import Tuna2Config, Tuna2ImageRole\n"
        "from .image_processing_tuna2 import Tuna2ImageProcessor\n"
        "from .modeling_tuna2 import Tuna2Cache, Tuna2ForConditionalGeneration\n"
        "from .processing_tuna2 import Tuna2Processor\n"
    ),
    "from transformers_tuna2.flow_matching import ": "from .flow_matching import ",
    "from transformers_tuna2.processing_tuna2 import ": "from .processing_tuna2 import ",
    "\nlogger = logging.get_logger(__name__)\n": (
        "\n# The processor loads its image processor through `AutoImageProcessor`, which knows the folder's class\n"
        "# once registered (as importing `transformers_tuna2` registers the package's).\n"
        "AutoImageProcessor.register(\n"
        '    Tuna2Config, image_processor_classes={"pil": Tuna2ImageProcessor}, exist_ok=True\n'
        ")\n"
        "logger = logging.get_logger(__name__)\n"
    ),
}
# What `from_pretrained` hands to the hub download, and to the model's own loading.
HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
MODEL_LOADING_OPTIONS = ("use_safetensors", "device_map", "quantization_config", "low_cpu_mem_usage")
MODEL_INDEX = "model_index.json"
# What a hub download brings besides the model's weights: configs, processor and tokenizer files, the scheduler and
# code saved with the checkpoint. Weights are chosen by `hub_allow_patterns`.
HUB_FILES = (
    MODEL_INDEX,
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "scheduler/*",
    "*.py",
)
# transformers' weight files: `model.safetensors`, `model.fp16-00001-of-00002.safetensors`, `pytorch_model.bin`,
# and their indexes `model.safetensors.index.json`, `model.safetensors.index.fp16.json`.
WEIGHT_FILE = re.compile(
    r"^(?:model|pytorch_model)(?:\.(?P<variant>[\w]+))?(?:-\d+-of-\d+)?\.(?P<format>safetensors|bin)$"
    r"|^(?:model|pytorch_model)\.(?P<index_format>safetensors|bin)\.index(?:\.(?P<index_variant>\w+))?\.json$"
)
COMPONENTS = ("model", "processor", "scheduler")


def official_sampling(model: Tuna2ForConditionalGeneration) -> dict:
    """The official sampling defaults of the model's variant: Tuna-2's, or Tuna-R's for a model with a vision
    encoder."""
    return OFFICIAL_TUNA_R_SAMPLING if model.config.vision_config is not None else OFFICIAL_SAMPLING


def check_sampling_method(sampling_method: str):
    if sampling_method not in SAMPLING_METHODS:
        raise ValueError(f"`sampling_method` must be one of {SAMPLING_METHODS}, got {sampling_method!r}")


def rescale_to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Tuna-R's decoding (the official `_decode_latents`): each `(3, H, W)` image of `images` `(N, 3, H, W)` min-max
    rescaled in fp32 to [-1, 1], `(z - min) / (max - min + 1e-5) * 2 - 1`. The official pipeline rescales its whole
    output tensor, which holds one image per call; here each image is rescaled alone, so that an image does not depend
    on the rest of the batch."""
    images = images.float()
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images - low) / (high - low + 1e-5) * 2 - 1


def hub_allow_patterns(
    filenames: list[str] | None, variant: str | None = None, use_safetensors: bool | None = None
) -> list[str]:
    """The `allow_patterns` of a hub download of a pipeline folder, as diffusers builds them from the components:
    [`HUB_FILES`] and the model's weight files (with their index) of `variant`, or the plain ones when the repo has
    none of that variant, in safetensors when it has them (`use_safetensors=False`: pickled `.bin`). Without a file
    list, patterns of the safetensors weights."""
    if filenames is None:
        stem = f"model.{variant}" if variant else "model"
        weights = [f"{stem}.safetensors", f"{stem}-*-of-*.safetensors", "model.safetensors.index.json"]
        if variant:
            weights.append(f"model.safetensors.index.{variant}.json")
        return [*HUB_FILES, *weights]
    weights = {}  # (variant, format) -> files
    for name in filenames:
        match = WEIGHT_FILE.match(name)
        if match:
            key = (match["variant"] or match["index_variant"], match["format"] or match["index_format"])
            weights.setdefault(key, []).append(name)
    chosen_variant = variant if any(v == variant for v, _ in weights) else None
    formats = {f for v, f in weights if v == chosen_variant}
    if use_safetensors is False:
        chosen_format = "bin"
    elif "safetensors" in formats or use_safetensors:
        chosen_format = "safetensors"
    else:
        chosen_format = "bin"
    return [*HUB_FILES, *sorted(weights.get((chosen_variant, chosen_format), []))]


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
        height (`int`), width (`int`): the size of the images the span is laid out for.
        editing (`bool`): whether the sequences hold an edit source.
        classifier_free_guidance (`bool`): whether the second half of the rows are the negative prompts'.
        past_key_values ([`Tuna2Cache`], *optional*): the prefix's keys and values, cut back to the prefix after
            every step (so that the encoded prompt serves several calls).
    """

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    image_roles: torch.LongTensor
    height: int
    width: int
    editing: bool
    classifier_free_guidance: bool
    condition_pixel_values: torch.Tensor | None = None
    past_key_values: Tuna2Cache | None = None


class Tuna2Pipeline(DiffusionPipeline, Tuna2LoraLoaderMixin):
    r"""
    Text-to-image generation and image editing with Tuna-2.

    Args:
        model ([`Tuna2ForConditionalGeneration`]): the Tuna-2 model (shared with understanding; not copied).
        processor ([`Tuna2Processor`]): owns the sequence layout.
        scheduler ([`SchedulerMixin`], *optional*): a flow-matching scheduler working in sigma = 1 - t;
            [`FlowMatchEulerDiscreteScheduler`] (the default) reproduces the official sampler. Set to `None` after
            construction (diffusers' optional component left out), the pipeline takes the official Euler steps
            itself, and saves and loads without a scheduler.
        negative_prompt (`str`, *optional*), edit_negative_prompt (`str`, *optional*): the checkpoint's default
            negative prompts for text-to-image and editing (saved in `model_index.json`). A model trained with
            caption dropout uses `""`.
        sampling_method (`str`, *optional*): the checkpoint's default sampler, `"euler"` or `"heun"` (officially
            Euler for Tuna-2, Heun for Tuna-R).
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

    def __init__(
        self,
        model: Tuna2ForConditionalGeneration,
        processor: Tuna2Processor,
        scheduler: SchedulerMixin | None = None,
        negative_prompt: str | None = None,
        edit_negative_prompt: str | None = None,
        guidance_scale: float | None = None,
        edit_guidance_scale: float | None = None,
        sampling_method: str | None = None,
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
            "sampling_method": sampling_method,
        }
        # Not given: the sampling defaults saved with the checkpoint the model (or processor) was loaded from, else
        # the official ones of the model's variant.
        saved = self.sampling_defaults_of(model, processor) if None in given.values() else {}
        official = official_sampling(model)
        self.register_to_config(
            **{key: saved.get(key, official[key]) if value is None else value for key, value in given.items()}
        )
        check_sampling_method(self.config.sampling_method)

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
            path = cls.download(
                str(pretrained_model_name_or_path),
                variant=kwargs.get("variant"),
                use_safetensors=kwargs.get("use_safetensors"),
                **{key: kwargs.pop(key) for key in HUB_OPTIONS if key in kwargs},
            )
        if "torch_dtype" in kwargs:
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        model_dtype = kwargs.get("dtype")
        if isinstance(model_dtype, dict):
            model_dtype = cls.model_dtype(model_dtype)
        variant = kwargs.get("variant")
        # transformers would raise an OSError about a missing file; diffusers names the variant, in these words.
        if variant is not None and not any(path.glob(f"*model.{variant}[.-]*")):
            raise ValueError(
                f"You are trying to load the model files of the `variant={variant}`, but no such modeling files are "
                f"available in {path}."
            )
        if (path / MODEL_INDEX).is_file():
            if variant is not None:  # diffusers looks for variants in component subfolders; the model is at the root
                model_options = {key: kwargs.pop(key) for key in MODEL_LOADING_OPTIONS if key in kwargs}
                kwargs["model"] = Tuna2ForConditionalGeneration.from_pretrained(
                    path, variant=kwargs.pop("variant"), dtype=model_dtype, **model_options
                )
            pipeline = super().from_pretrained(path, **kwargs)
            # diffusers hands a component saved as absent (`[null, null]`) to `__init__` as None, which builds the
            # default scheduler there: the folder's pipeline had none.
            saved_scheduler = json.loads((path / MODEL_INDEX).read_text()).get("scheduler", [None])
            if saved_scheduler[0] is None and "scheduler" not in kwargs:
                pipeline.scheduler = None
            return pipeline
        kwargs.pop("dtype", None)
        pipeline_options = {
            key: kwargs.pop(key) for key in inspect.signature(cls.__init__).parameters if key in kwargs
        }
        processor = pipeline_options.pop("processor", None) or Tuna2Processor.from_pretrained(path)
        model = pipeline_options.pop("model", None) or Tuna2ForConditionalGeneration.from_pretrained(
            path, dtype=model_dtype, **kwargs
        )
        return cls(model=model, processor=processor, **pipeline_options)

    @classmethod
    def download(
        cls,
        repo_id: str,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        local_files_only: bool = False,
        **hub_options,
    ) -> Path:
        """Downloads what loading the pipeline reads from a hub repo (diffusers' `DiffusionPipeline.download` for
        this layout, the model at the root): the weights of `variant` (else the plain ones) in one format
        (safetensors when there are, unless `use_safetensors=False`), configs, processor, tokenizer, scheduler and
        saved code; other variants, the other format and other files (an official `.pt`, images) stay on the hub.
        Offline (`local_files_only`), the repo's file list is unknown: the cached safetensors weights are read."""
        if local_files_only:
            filenames = None
        else:
            listing_options = {key: hub_options[key] for key in ("revision", "token") if key in hub_options}
            filenames = list_repo_files(repo_id, **listing_options)
        allow_patterns = hub_allow_patterns(filenames, variant, use_safetensors)
        return Path(
            snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=local_files_only, **hub_options)
        )

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
        """The default negative prompts, guidance scales and sampler a checkpoint folder's `model_index.json` sets, if
        any."""
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

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        save_pipeline_code: bool = False,
        **kwargs,
    ):
        """Writes one folder for both libraries: the model (one copy of the weights), processor and tokenizer at the
        root, the scheduler in `scheduler/`, and `model_index.json`. With `push_to_hub`, the whole folder is then
        uploaded in one commit, as diffusers does (`repo_id`, defaulting to the folder's name, `token`, `private`,
        `create_pr` and `commit_message` as in `DiffusionPipeline.save_pretrained`).

        With `save_pipeline_code`, the folder also names its pipeline class the way diffusers' custom pipelines do
        (`pipeline_tuna2.py` and `_class_name: ["pipeline_tuna2", "Tuna2Pipeline"]`), so that
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads a `Tuna2Pipeline` where this
        package is installed."""
        save_directory = Path(save_directory)
        if push_to_hub:
            commit_message = kwargs.pop("commit_message", None)
            create_pr = kwargs.pop("create_pr", False)
            token = kwargs.pop("token", None)
            private = kwargs.pop("private", None)
            repo_id = kwargs.pop("repo_id", save_directory.name)
            repo_id = create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
        model_options = {"variant": variant}
        if max_shard_size is not None:
            model_options["max_shard_size"] = max_shard_size
        self.model.save_pretrained(save_directory, **model_options, **kwargs)
        self.processor.save_pretrained(save_directory)
        self.save_scheduler_and_index(save_directory, save_pipeline_code=save_pipeline_code)
        if push_to_hub:
            upload_folder(
                repo_id=repo_id,
                folder_path=save_directory,
                token=token,
                commit_message=commit_message or "Upload pipeline",
                create_pr=create_pr,
            )

    def save_scheduler_and_index(self, save_directory: str | os.PathLike, save_pipeline_code: bool = False):
        """Writes what the pipeline adds to a transformers checkpoint folder: `scheduler/` and `model_index.json`,
        and with `save_pipeline_code` the pipeline's module file ([`save_pretrained`]). `tuna2 convert` and
        `tuna2 init` (`diffusers_tuna2.conversion`) use it after the transformers converters."""
        save_directory = Path(save_directory)
        if self.scheduler is not None:
            self.scheduler.save_pretrained(save_directory / "scheduler")
        index = json.loads(self.to_json_string())
        index.pop("_name_or_path", None)  # where a loaded pipeline came from, not a fact of the saved folder
        if save_pipeline_code:
            self.save_pipeline_code(save_directory)
            index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
        (save_directory / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    @classmethod
    def save_pipeline_code(cls, save_directory: str | os.PathLike):
        """Writes the model's and processor's code (as `transformers_tuna2.register_for_auto_class()` would), this
        module (its imports of `transformers_tuna2` turned to that code) and the modules it imports from this package
        into `save_directory`."""
        save_directory = Path(save_directory)
        for cls in (Tuna2ForConditionalGeneration, Tuna2Processor):
            custom_object_save(cls, save_directory)  # the class's module and every module it imports relatively
        # diffusers copies into its module cache only the modules a local pipeline file imports itself, so the copy
        # also imports those the model's code imports.
        model_code = {
            Path(name).stem for code in MODEL_CODE for name in get_relative_import_files(save_directory / code)
        }
        indirect = sorted(model_code - {Path(code).stem for code in MODEL_CODE})
        folder_imports = dict(FOLDER_IMPORTS)
        folder_imports[FIRST_PACKAGE_IMPORT] = folder_imports[FIRST_PACKAGE_IMPORT] + "".join(
            f"from .{module} import __name__ as _{module}  # noqa: F401  (imported by the model's code)\n"
            for module in indirect
        )
        source = Path(__file__).read_text()
        for package_import, folder_import in folder_imports.items():
            if package_import not in source:
                raise RuntimeError(f"{PIPELINE_MODULE}.py no longer imports {package_import.strip()!r}")
            source = source.replace(package_import, folder_import)
        header = (
            f"# Written by `{cls.__name__}.save_pretrained(..., save_pipeline_code=True)` from `diffusers_tuna2`'s\n"
            f"# {PIPELINE_MODULE}.py, its imports of `transformers_tuna2` turned to the model code of this folder.\n"
            "# ruff: noqa: I001\n"
        )
        (save_directory / f"{PIPELINE_MODULE}.py").write_text(header + source)
        for helper in PIPELINE_HELPERS:
            (save_directory / helper).write_text((Path(__file__).parent / helper).read_text())

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' `extract_init_dict`, the model and processor entries naming the classes this module imports:
        loaded from a folder's copy (`save_pipeline_code`), those are the folder's own model code, where
        `model_index.json` names this package's."""
        init_dict, unused_kwargs, hidden_config = super().extract_init_dict(config_dict, **kwargs)
        for name, component_class in (("model", Tuna2ForConditionalGeneration), ("processor", Tuna2Processor)):
            entry = init_dict.get(name)
            if isinstance(entry, (list, tuple)) and entry[1] == component_class.__name__:
                init_dict[name] = [component_class.__module__, component_class.__name__]
        return init_dict, unused_kwargs, hidden_config

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' `load_config`; a folder whose `_class_name` names its pipeline module (`save_pipeline_code`)
        names this class, which loads without running the folder's code."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config.get("_class_name"), list) and config["_class_name"][1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return loaded

    # ------------------------------------------------------------------------------------------------ properties

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """`(height, width)` of the images a call draws: the given sides, else the processor's fixed size if it has
        one, else `IMAGE_SIZE` square."""
        fixed = self.processor.image_processor.size or {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
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
        prompt_embeds=None,
    ):
        if prompt_embeds is not None:
            self.check_prompt_embeds(
                prompt, negative_prompt, image, num_images_per_prompt, guidance_scale, prompt_embeds
            )
            editing, total = prompt_embeds.editing, self.num_images(prompt_embeds)
        else:
            self.check_prompt(prompt, negative_prompt, image)
            editing = image is not None
            total = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        patch_size = self.model.config.patch_size
        if height <= 0 or width <= 0 or height % patch_size or width % patch_size:
            raise ValueError(
                f"height and width must be positive multiples of the patch size {patch_size}, got {height}x{width}"
            )
        needed = generation_length(self.processor.num_span_slots(height, width), editing=editing)
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
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"got {len(generator)} generators for {total} images (prompts x num_images_per_prompt)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback tensor inputs must be among {self._callback_tensor_inputs}, got {unknown}")

    @staticmethod
    def check_prompt(prompt, negative_prompt, image):
        if prompt is None:
            raise ValueError(
                "Provide either `prompt` or `prompt_embeds`. Cannot leave both `prompt` and `prompt_embeds` undefined."
            )
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

    @staticmethod
    def check_prompt_embeds(prompt, negative_prompt, image, num_images_per_prompt, guidance_scale, prompt_embeds):
        """The prompts, negative prompts, edit sources and repeats are in `prompt_embeds` ([`encode_prompt`])."""
        if prompt is not None:
            raise ValueError(
                f"Cannot forward both `prompt`: {prompt} and `prompt_embeds`. Please make sure to only forward one of "
                "the two."
            )
        for name, value in (("negative_prompt", negative_prompt), ("image", image)):
            if value is not None:
                raise ValueError(f"`{name}` is encoded in `prompt_embeds`: pass it to `encode_prompt`")
        if num_images_per_prompt != 1:
            raise ValueError("`num_images_per_prompt` is encoded in `prompt_embeds`: pass it to `encode_prompt`")
        if prompt_embeds.classifier_free_guidance != (guidance_scale != 1.0):
            held = "holds negative prompts" if prompt_embeds.classifier_free_guidance else "holds no negative prompt"
            raise ValueError(
                f"`prompt_embeds` {held}, which guidance_scale={guidance_scale} does not match: encode with "
                f"`negative_prompt` for guidance_scale != 1, without for 1"
            )

    @staticmethod
    def num_images(prompt_embeds: Tuna2EncodedPrompt) -> int:
        """The number of images `prompt_embeds` draws (its rows, less the negative ones)."""
        targets = int((prompt_embeds.image_roles == Tuna2ImageRole.TARGET).sum())
        return targets // 2 if prompt_embeds.classifier_free_guidance else targets

    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        images: list | None = None,
        device: torch.device | None = None,
        use_prefix_cache: bool = True,
        num_images_per_prompt: int = 1,
    ) -> Tuna2EncodedPrompt:
        """Tokenizes the conditional sequences, then the negative ones (given for classifier-free guidance only; a
        string applies to every prompt), for `height x width` images (the pipeline's default size when not given);
        `images` are the sources of edits, one per prompt. With `use_prefix_cache`, the fixed prefix (prompt, and
        source image when editing) runs once through the model into a [`Tuna2Cache`]; every denoising step then
        feeds only the span of the image being generated. Each prompt is encoded once and its rows (cache rows
        included) repeated `num_images_per_prompt` times, as Flux repeats its prompt embeddings."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        height, width = self.image_size(height, width)
        device = device if device is not None else self._execution_device
        texts = prompts + (negative_prompt or [])
        sources = (images * (2 if negative_prompt else 1)) if images is not None else None
        max_length = self.model.config.text_config.max_position_embeddings
        inputs = self.processor.generation_inputs(texts, height, width, source_images=sources, max_length=max_length)

        def repeat(rows: torch.Tensor) -> torch.Tensor:
            return rows.to(device).repeat_interleave(num_images_per_prompt, dim=0)

        layout = dict(
            height=height, width=width, editing=images is not None, classifier_free_guidance=bool(negative_prompt)
        )
        roles_per_row = inputs["image_roles"].view(len(texts), -1)
        prefix_ids, prefix_mask, span_ids = inputs["input_ids"], inputs["attention_mask"], inputs["span_ids"]
        if not use_prefix_cache:
            input_ids = torch.cat([prefix_ids, span_ids, inputs["suffix_ids"]], dim=1)
            attention_mask = torch.cat([prefix_mask, torch.ones_like(input_ids[:, prefix_ids.shape[1] :])], dim=1)
            conditions = repeat(inputs["pixel_values"]) if sources is not None else None
            return Tuna2EncodedPrompt(
                input_ids=repeat(input_ids),
                attention_mask=repeat(attention_mask),
                image_roles=repeat(roles_per_row).flatten(),
                condition_pixel_values=conditions,
                **layout,
            )
        cache = Tuna2Cache(config=self.model.config)
        self.model(
            input_ids=prefix_ids.to(device),
            attention_mask=prefix_mask.to(device),
            pixel_values=inputs["pixel_values"].to(device) if sources is not None else None,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.batch_repeat_interleave(num_images_per_prompt)
        span_ids = repeat(span_ids)
        return Tuna2EncodedPrompt(
            input_ids=span_ids,
            attention_mask=torch.cat([repeat(prefix_mask), torch.ones_like(span_ids)], dim=1),
            image_roles=repeat(roles_per_row[:, -1:]).flatten(),
            past_key_values=cache,
            **layout,
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

    def predict_velocity(self, prompt_inputs: Tuna2EncodedPrompt, latents: torch.Tensor, t: torch.Tensor):
        """The velocity `(N, 3, H, W)` of the states `latents` at time t: the model's x0, guided (with the scale of
        `guidance_scale_at(t)`) when the prompts hold negative ones, as `v = (x0 - z) / max(1 - t, t_eps)`."""
        states = torch.cat([latents, latents]) if self.do_classifier_free_guidance else latents
        # One row of logits, which denoising does not read.
        x0 = self.model(**self.step_inputs(prompt_inputs, states, t), logits_to_keep=1).x0
        if prompt_inputs.past_key_values is not None:
            prompt_inputs.past_key_values.crop(-prompt_inputs.input_ids.shape[1])
        if self.do_classifier_free_guidance:
            x0_cond, x0_uncond = x0.chunk(2)
            x0 = guided_x0(x0_cond, x0_uncond, self.guidance_scale_at(t))
        return velocity(x0, latents, t, self.model.config.t_eps)

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
        prompt: str | list[str] | None = None,
        image=None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = NUM_INFERENCE_STEPS,
        guidance_scale: float | None = None,
        sampling_method: str | None = None,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        use_prefix_cache: bool = True,
        prompt_embeds: Tuna2EncodedPrompt | None = None,
    ):
        r"""
        Args:
            prompt (`str` or `list[str]`): what to draw, or the editing instruction. `""` is allowed. Not with
                `prompt_embeds`.
            image (PIL image, `np.ndarray`, `torch.Tensor`, a file path or URL, or a list, *optional*): image(s) to
                edit (one for all prompts, or one per prompt); arrays are `(H, W, 3)`, tensors `(3, H, W)`, uint8 or
                float in [0, 1].
                Each is resized to cover `height x width` and center-cropped, and enters clean (t=1).
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional branch; defaults to the pipeline's
                `negative_prompt` or `edit_negative_prompt` (the official ones unless the checkpoint says otherwise).
                `""` gives the empty unconditional prompt.
            height, width (`int`, *optional*): any multiples of the patch size (buckets: 512x512, 448x576, ...);
                default to the processor's fixed size if it has one, else 512.
            num_inference_steps (`int`, defaults to 50): sampler steps.
            guidance_scale (`float`, *optional*): CFG on x0; defaults to the pipeline's `guidance_scale` or
                `edit_guidance_scale` (officially 3.0 and 2.0 for Tuna-2, 4.0 and 5.0 for Tuna-R); 1.0 turns it off.
            sampling_method (`str`, *optional*): `"euler"` or `"heun"`, defaults to the pipeline's
                `sampling_method` (officially Euler for Tuna-2, Heun for Tuna-R). Euler steps through the scheduler
                (the default one is the official Euler sampler); Heun is the official sampler's: on the official grid
                (the scheduler is not used), a Heun step (two model calls, the second at the next time) for every step
                but the last, which is an Euler step.
            cfg_interval (`tuple[float, float]`, defaults to `(0.0, 1.0)`): CFG applies when
                `t < high and (low == 0 or t > low)` (official rule); elsewhere the conditional x0 is used.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or a list, one per image): seeds the initial noise.
            latents (`torch.Tensor`, *optional*): initial state `z_0` of shape `(num_images, 3, height, width)`.
            output_type (`str`, defaults to `"pil"`): `"pil"` or `"np"` (uint8 with the official conversion
                `uint8(clamp((z + 1) / 2, 0, 1) * 255)`), `"pt"` (float `(N, 3, H, W)` in [0, 1]), `"latent"` (the
                final state z in [-1, 1] pixel space). For Tuna-R, each image's z is first min-max rescaled to
                [-1, 1], as the official Tuna-R pipeline decodes (not for `"latent"`).
            return_dict (`bool`, defaults to `True`): return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): `callback(pipe, step, timestep, callback_kwargs)` after
                each step; it may return `{"latents": ...}` to replace the state.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): tensors passed to it.
            use_prefix_cache (`bool`, defaults to `True`): run the prompt (and edit source) once and only the image
                span at each step; `False` recomputes whole sequences at each step, like the official pipeline.
            prompt_embeds ([`Tuna2EncodedPrompt`], *optional*): what [`encode_prompt`] returned, in place of
                `prompt`, `negative_prompt`, `image` and `num_images_per_prompt` (the size and the prefix cache are
                the encoded ones); it serves any number of calls.
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
        editing = image is not None if prompt_embeds is None else prompt_embeds.editing
        if prompt_embeds is not None:
            height, width = prompt_embeds.height, prompt_embeds.width
        height, width = self.image_size(height, width)
        if guidance_scale is None:
            guidance_scale = self.config.edit_guidance_scale if editing else self.config.guidance_scale
        sampling_method = sampling_method or self.config.sampling_method
        check_sampling_method(sampling_method)
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
            prompt_embeds,
        )
        self._guidance_scale = guidance_scale
        self._cfg_interval = cfg_interval
        self._interrupt = False
        device = self._execution_device
        dtype = self.model.dtype

        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if negative_prompt is None:
                negative_prompt = self.config.edit_negative_prompt if editing else self.config.negative_prompt
            images = None
            if editing:
                images = image if isinstance(image, list) else [image]
                images = images * len(prompts) if len(images) == 1 else images
            prompt_embeds = self.encode_prompt(
                prompts,
                negative_prompt if self.do_classifier_free_guidance else None,
                height,
                width,
                images,
                device,
                use_prefix_cache,
                num_images_per_prompt,
            )
        num_images = self.num_images(prompt_embeds)
        latents = self.prepare_latents(num_images, height, width, dtype, device, generator, latents)
        heun = sampling_method == "heun"
        grid = timestep_grid(num_inference_steps, dtype).to(device)
        if self.scheduler is not None and not heun:
            sigmas = self.sigmas(num_inference_steps, dtype)
            timesteps, num_inference_steps = retrieve_timesteps(
                self.scheduler, num_inference_steps, device, sigmas=sigmas
            )
            times = 1 - timesteps.float() / self.scheduler.config.num_train_timesteps
        else:  # the official sampler's own steps on its grid; the callbacks get the times t
            times = timesteps = grid[:-1]
        self._num_timesteps = len(timesteps)

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, timestep in enumerate(timesteps):
                if self.interrupt:
                    continue
                t = times[i]
                v = self.predict_velocity(prompt_embeds, latents, t)
                if heun and i + 1 < len(timesteps):  # the official Heun step: the mean of v at both ends
                    t_next = grid[i + 1]
                    v_next = self.predict_velocity(prompt_embeds, latents + (t_next - t) * v, t_next)
                    v = 0.5 * (v + v_next)
                if self.scheduler is None or heun:
                    latents = latents + (grid[i + 1] - t) * v
                else:  # the scheduler integrates in sigma = 1 - t, so its model output is dz/dsigma = -v
                    latents = self.scheduler.step(-v, timestep, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, i, timestep, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        if output_type == "latent":
            output = latents
        else:
            images = rescale_to_unit_range(latents) if self.model.config.vision_config is not None else latents
            if output_type == "pt":
                output = ((images.float() + 1) / 2).clamp(0, 1)
            else:
                output = self.processor.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output,)
        return ImagePipelineOutput(images=output)


__all__ = ["Tuna2EncodedPrompt", "Tuna2Pipeline"]
