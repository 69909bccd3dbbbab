"""Tuna-2 for transformers. Importing this package registers Tuna-2 with the Auto classes (in this process; see
`register_for_auto_class` to make saved checkpoints load without the package)."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .attention_maps import Tuna2AttentionMaps, attention_maps, overlay_attention_map
from .configuration_tuna2 import Tuna2Config, Tuna2ImageRole
from .image_processing_tuna2 import Tuna2ImageProcessor
from .modeling_tuna2 import Tuna2Cache, Tuna2ForConditionalGeneration, Tuna2Model, Tuna2PreTrainedModel
from .processing_tuna2 import Tuna2Processor

AutoConfig.register("tuna2", Tuna2Config, exist_ok=True)
AutoModel.register(Tuna2Config, Tuna2Model, exist_ok=True)
AutoModelForImageTextToText.register(Tuna2Config, Tuna2ForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(Tuna2Config, image_processor_classes={"pil": Tuna2ImageProcessor}, exist_ok=True)
AutoProcessor.register(Tuna2Config, Tuna2Processor, exist_ok=True)


def register_for_auto_class():
    """Makes `save_pretrained` of the Tuna-2 classes copy this package's code into the folders it writes, with the
    `auto_map` that points the Auto classes to it, so that `trust_remote_code=True` loads them where the package is
    not installed (transformers' `register_for_auto_class`, for every class at once). Without it, a saved folder
    holds weights and configuration only, and loads with this package installed. Call it once, before saving:

        import transformers_tuna2

        transformers_tuna2.register_for_auto_class()
        model.save_pretrained(path)
        processor.save_pretrained(path)
    """
    Tuna2Config.register_for_auto_class()
    Tuna2Model.register_for_auto_class("AutoModel")
    Tuna2ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    Tuna2ImageProcessor.register_for_auto_class("AutoImageProcessor")
    Tuna2Processor.register_for_auto_class("AutoProcessor")


__all__ = [
    "Tuna2AttentionMaps",
    "Tuna2Cache",
    "Tuna2Config",
    "Tuna2ForConditionalGeneration",
    "Tuna2ImageProcessor",
    "Tuna2ImageRole",
    "Tuna2Model",
    "Tuna2PreTrainedModel",
    "Tuna2Processor",
    "attention_maps",
    "overlay_attention_map",
    "register_for_auto_class",
]
