"""LoRA loading for [`Tuna2Pipeline`], kept apart from the pipeline as diffusers keeps its loaders
(`diffusers.loaders.lora_pipeline`): diffusers-format files (`pytorch_lora_weights.safetensors`, keys
`model.<module>.lora_A.weight`) and PEFT adapter folders, injected into the transformers model through its PEFT
integration. Built on diffusers' public `LoraBaseMixin` (adapters, fusing, writing files), huggingface_hub,
safetensors, accelerate's hooks and peft's `LoraConfig`."""

import contextlib
import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.hooks import HookRegistry
from diffusers.loaders.lora_base import (
    LORA_ADAPTER_METADATA_KEY,
    LORA_WEIGHT_NAME,
    LORA_WEIGHT_NAME_SAFE,
    LoraBaseMixin,
)
from diffusers.utils import is_peft_available, logging
from diffusers.utils.peft_utils import get_adapter_name
from huggingface_hub import file_exists, hf_hub_download
from safetensors import safe_open

logger = logging.get_logger(__name__)

PEFT_CONFIG_NAME = "adapter_config.json"
# The name diffusers' group offloading registers its hook under (`diffusers.hooks.group_offloading`).
GROUP_OFFLOADING_HOOK = "group_offloading"
HUB_OPTIONS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


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


def lora_config_of(state_dict: dict[str, torch.Tensor], metadata: dict | None) -> "peft.LoraConfig":  # noqa: F821
    """The `LoraConfig` of a LoRA state dict (keys `<module>.lora_A.weight`): the one saved in the file's metadata,
    else read from the weights (the most common rank as `r`, the others in `rank_pattern`, `lora_alpha = r`, as
    diffusers guesses it)."""
    from peft import LoraConfig

    if metadata:
        return LoraConfig(**metadata)
    ranks = {lora_module(key): value.shape[1] for key, value in state_dict.items() if key.endswith("lora_B.weight")}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        rank_pattern={module: r for module, r in ranks.items() if r != rank},
        alpha_pattern={module: r for module, r in ranks.items() if r != rank},
        use_dora=any("lora_magnitude_vector" in key for key in state_dict),
        lora_bias=any(key.endswith("lora_B.bias") for key in state_dict),
    )


def load_adapter(model, adapter_name: str, *args, **kwargs):
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
def offloading_hooks_removed(pipeline):
    """Takes accelerate's CPU-offloading hooks off the pipeline while adapters are injected, and puts them back
    after, as diffusers' LoRA loaders do. Group offloading holds references to the weights it moves, so adapters
    must be loaded before it is enabled."""
    from accelerate.hooks import AlignDevicesHook, CpuOffload, remove_hook_from_module

    modules = [c for c in pipeline.components.values() if isinstance(c, torch.nn.Module)] if pipeline else []
    # diffusers has no public test for group offloading on a module that is not its own `ModelMixin`; its hooks live
    # in a `HookRegistry` under `_diffusers_hook` (tests/test_lora_diffusers.py checks this still holds).
    registries = [getattr(m, "_diffusers_hook", None) for module in modules for m in module.modules()]
    if any(isinstance(r, HookRegistry) and r.get_hook(GROUP_OFFLOADING_HOOK) for r in registries):
        raise ValueError("load LoRAs before enabling group offloading (its hooks hold the weights adapters replace)")
    hooks = [getattr(module, "_hf_hook", None) for module in modules if pipeline.hf_device_map is None]
    model_offload = any(isinstance(hook, CpuOffload) for hook in hooks)
    sequential_offload = any(
        isinstance(hook, AlignDevicesHook) or isinstance(getattr(hook, "hooks", [None])[0], AlignDevicesHook)
        for hook in hooks
    )
    if model_offload or sequential_offload:
        for module in modules:
            remove_hook_from_module(module, recurse=sequential_offload)
    try:
        yield
    finally:
        if model_offload:
            pipeline.enable_model_cpu_offload()
        elif sequential_offload:
            pipeline.enable_sequential_cpu_offload()


def read_lora_file(
    pretrained_model_name_or_path: str | os.PathLike,
    weight_name: str | None = None,
    use_safetensors: bool | None = None,
    **hub_options,
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The state dict and LoRA config (from the safetensors metadata; None when absent) of a LoRA file: the file
    itself, or `weight_name` (default `pytorch_lora_weights.safetensors`, else `.bin` unless `use_safetensors`) in a
    local folder or hub repo."""
    path = Path(pretrained_model_name_or_path)
    if path.is_file():
        weight_file = path
    else:
        if weight_name is not None:
            names = [weight_name]
        elif use_safetensors is None:  # the safetensors file, else the pickled one, as diffusers looks them up
            names = [LORA_WEIGHT_NAME_SAFE, LORA_WEIGHT_NAME]
        else:
            names = [LORA_WEIGHT_NAME_SAFE if use_safetensors else LORA_WEIGHT_NAME]
        exists_options = {key: hub_options[key] for key in ("revision", "token") if key in hub_options}
        weight_file = None
        for name in names:
            local = path / (hub_options.get("subfolder") or "") / name
            if local.is_file():
                weight_file = local
            elif not path.is_dir() and file_exists(
                str(pretrained_model_name_or_path),
                "/".join(filter(None, [hub_options.get("subfolder"), name])),
                **exists_options,
            ):
                weight_file = Path(hf_hub_download(str(pretrained_model_name_or_path), name, **hub_options))
            if weight_file is not None:
                break
        if weight_file is None:
            raise ValueError(f"no LoRA file ({' or '.join(names)}) in {pretrained_model_name_or_path}")
    if weight_file.suffix != ".safetensors":
        return torch.load(weight_file, map_location="cpu", weights_only=True), None
    with safe_open(weight_file, "pt") as file:
        state_dict = {key: file.get_tensor(key) for key in file.keys()}
        metadata = (file.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    return state_dict, json.loads(metadata) if metadata else None


class Tuna2LoraLoaderMixin(LoraBaseMixin):
    r"""
    LoRA loading for [`Tuna2Pipeline`], as diffusers' `FluxLoraLoaderMixin` is for Flux: the model is the one
    component that takes adapters, and the keys of a diffusers-format LoRA file start with its name (`model.`), as
    `transformer.` in the transformer pipelines. Adapters are managed by diffusers' `LoraBaseMixin`
    (`set_adapters`, `fuse_lora`, `unload_lora_weights`, ...).
    """

    _lora_loadable_modules = ["model"]
    model_name = "model"

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict, **kwargs):
        """The LoRA state dict of a diffusers-format file (`pytorch_lora_weights.safetensors` in a folder or hub
        repo, or `weight_name`), or of a dict: keys `model.<module>.lora_A.weight` and `...lora_B.weight`. With
        `return_lora_metadata=True`, also the LoRA config the file's metadata carries (its keys prefixed with
        `model.` too; `None` when absent)."""
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            state_dict, metadata = pretrained_model_name_or_path_or_dict, None
        else:
            hub_options = {key: kwargs.pop(key) for key in HUB_OPTIONS if kwargs.get(key) is not None}
            state_dict, metadata = read_lora_file(
                pretrained_model_name_or_path_or_dict,
                weight_name=kwargs.pop("weight_name", None),
                use_safetensors=kwargs.pop("use_safetensors", None),
                **hub_options,
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
            with offloading_hooks_removed(self):
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
        repo = str(pretrained_model_name_or_path_or_dict)
        return file_exists(repo, PEFT_CONFIG_NAME) and not file_exists(repo, LORA_WEIGHT_NAME_SAFE)

    @classmethod
    def load_lora_into_model(
        cls,
        state_dict: dict[str, torch.Tensor],
        model,
        adapter_name: str | None = None,
        metadata: dict | None = None,
        _pipeline=None,
        hotswap: bool = False,
        low_cpu_mem_usage: bool = False,
    ):
        """Injects a diffusers-format LoRA state dict (keys `model.<module>.lora_A.weight`) into `model` through
        transformers' PEFT integration (`load_adapter` with the state dict and its `LoraConfig`). The config is the
        file's metadata when it has one, else read from the weights ([`lora_config_of`])."""
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
        if adapter_name is None:
            adapter_name = get_adapter_name(model)
        with offloading_hooks_removed(_pipeline):
            load_adapter(
                model,
                adapter_name,
                adapter_state_dict=state_dict,
                peft_config=lora_config_of(state_dict, metadata),
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
        """Writes a LoRA in the diffusers format, as diffusers pipelines write theirs (`LoraBaseMixin.pack_weights`
        and `write_lora_layers`): `pytorch_lora_weights.safetensors` with keys `model.<module>.lora_A.weight`, and
        the LoRA config, its keys prefixed with `model.`, as JSON under `lora_adapter_metadata` in the safetensors
        metadata.

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
        metadata = None
        if model_lora_adapter_metadata:
            metadata = {f"{cls.model_name}.{key}": value for key, value in model_lora_adapter_metadata.items()}
        cls.write_lora_layers(
            state_dict=cls.pack_weights(model_lora_layers, cls.model_name),
            save_directory=save_directory,
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
            lora_adapter_metadata=metadata,
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
            components=components or [self.model_name],
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs):
        """Takes the fused adapters back out of the model's weights."""
        super().unfuse_lora(components=components or [self.model_name], **kwargs)


__all__ = ["Tuna2LoraLoaderMixin"]
