"""A tiny Tuna-2 configuration and inputs in the shape transformers' common model tests expect of a model tester.

Each sample is text with one image: `<|vision_start|>`, an image span (`<|image_pad|>` once for the time slot and
once per patch) and `<|vision_end|>`, with `pixel_values` holding one image per sample, as the processor gives them.
"""

import torch

from transformers_tuna2 import Tuna2Config


class Tuna2ModelTester:
    def __init__(
        self,
        parent,
        batch_size=3,
        text_length=7,
        image_size=8,
        patch_size=4,
        num_channels=3,
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        flow_head_num_layers=2,
        is_training=True,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.text_length = text_length
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.flow_head_num_layers = flow_head_num_layers
        self.is_training = is_training
        # The special tokens sit at the bottom of the vocabulary (the embedding-resizing tests clamp the ids to a
        # smaller vocabulary), the text above them.
        self.pad_token_id = 0
        self.eos_token_id = 1
        self.vision_start_token_id = 2
        self.image_token_id = 3
        self.vision_end_token_id = 4
        self.first_text_id = 5
        self.span_length = 1 + (image_size // patch_size) ** 2
        # The text (the boi and eoi tokens among it) and the image span.
        self.seq_length = text_length + self.span_length

    def get_config(self) -> Tuna2Config:
        text_config = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": 512,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": None,
        }
        return Tuna2Config(
            text_config=text_config,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            timestep_frequency_dim=32,
            flow_head_num_layers=self.flow_head_num_layers,
            flow_head_num_attention_heads=2,
            flow_head_num_key_value_heads=1,
            flow_head_head_dim=8,
            flow_head_intermediate_size=self.intermediate_size,
            image_rope_sections=[2, 2, 4],
            image_token_id=self.image_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
        )

    def prepare_config_and_inputs(self):
        config = self.get_config()
        input_ids = torch.randint(self.first_text_id, self.vocab_size, (self.batch_size, self.seq_length))
        start = 2  # the span ends before the last tokens, which the embedding-resizing tests overwrite
        input_ids[:, start] = self.vision_start_token_id
        input_ids[:, start + 1 : start + 1 + self.span_length] = self.image_token_id
        input_ids[:, start + 1 + self.span_length] = self.vision_end_token_id
        attention_mask = torch.ones_like(input_ids)
        pixel_values = torch.rand(self.batch_size, self.num_channels, self.image_size, self.image_size) * 2 - 1
        return config, input_ids, attention_mask, pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask, pixel_values = self.prepare_config_and_inputs()
        inputs_dict = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
        return config, inputs_dict
