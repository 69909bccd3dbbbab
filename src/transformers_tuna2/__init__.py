"""Tuna-2 for transformers. Importing this package registers Tuna-2 with the Auto classes."""

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

# save_pretrained then writes `auto_map` and copies the code, so that `trust_remote_code=True` loads a checkpoint
# without this package.
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
]
