"""Creates the untrained shapes-demo Tuna-2: a tokenizer learned from the training texts, a small configuration with
`output_layout="patch"`, the official initialisation, and a 64x64 processor, saved as a checkpoint folder.

    python examples/shapes/init_model.py --data data/shapes --output shapes-init
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import COLOURS, POSITIONS, QUESTIONS, SHAPES, SIZE  # noqa: E402

from diffusers_tuna2 import Tuna2Pipeline  # noqa: E402
from transformers_tuna2 import Tuna2Config, Tuna2ForConditionalGeneration, Tuna2ImageProcessor, Tuna2Processor  # noqa: E402
from transformers_tuna2.processing_tuna2 import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from tuna2_training.tokenizer import train_byte_level_tokenizer  # noqa: E402


def training_texts(data: Path) -> list[str]:
    texts = [DEFAULT_SYSTEM_PROMPT, "system user assistant", " ".join([*COLOURS, *SHAPES, *POSITIONS])]
    texts += list(QUESTIONS.values())
    for line in (data / "t2i.jsonl").read_text().splitlines():
        texts.append(json.loads(line)["caption"])
    for line in (data / "mmu.jsonl").read_text().splitlines():
        texts += [turn["value"] for turn in json.loads(line)["conversations"]]
    for line in (data / "edit.jsonl").read_text().splitlines():
        texts.append(json.loads(line)["instruction"])
    return texts


def demo_config(tokenizer) -> Tuna2Config:
    ids = tokenizer.convert_tokens_to_ids
    return Tuna2Config(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=ids("<|im_start|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        ),
        flow_head_num_layers=4,
        flow_head_num_attention_heads=4,
        flow_head_num_key_value_heads=2,
        flow_head_intermediate_size=768,
        image_token_id=ids("<|image_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        output_layout="patch",
        # 64x64 images need less noise than the official 512x512 ones (JiT scales the noise with the resolution).
        noise_scale=1.0,
        # A small model learning from scratch: no masked image modelling, no noise on understanding images.
        use_mask_token=False,
        understanding_noise_prob=0.0,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the folder written by make_data.py")
    parser.add_argument("--output", required=True)
    parser.add_argument("--vocab-size", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = train_byte_level_tokenizer(training_texts(Path(args.data)), args.vocab_size)
    processor = Tuna2Processor(Tuna2ImageProcessor(size={"height": SIZE, "width": SIZE}), tokenizer)
    model = Tuna2ForConditionalGeneration(demo_config(tokenizer))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Trained with caption dropout, the demo's unconditional branch is the empty prompt.
    pipe = Tuna2Pipeline(model=model, processor=processor, negative_prompt="", edit_negative_prompt="")
    pipe.save_pretrained(args.output)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {len(tokenizer)} -> {args.output}")


if __name__ == "__main__":
    main()
