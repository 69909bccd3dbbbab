import PIL.Image
import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer

from transformers_tuna2 import Tuna2ImageProcessor, Tuna2Processor
from tuna2_training.tiny import build_processor, build_tokenizer


def test_single_image_question_reproduces_official_evaluation_sequence(official_tokenizer, official_reference):
    """The official MMU evaluation prompt (system prompt, "<image>\\n" + question, generation prompt), as the official
    pipeline tokenized it, with the image expanded to boi + 17 image pads + eoi."""
    processor = Tuna2Processor(Tuna2ImageProcessor(size={"height": 64, "width": 64}), official_tokenizer)
    image = PIL.Image.fromarray(official_reference["mmu_64x64.image_uint8"].numpy())
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": "What shapes and colors are in this image?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs.input_ids.tolist() == official_reference["mmu_64x64.input_ids"].tolist()
    assert torch.equal(inputs.pixel_values, official_reference["mmu_64x64.pixel_values"])
    assert inputs.attention_mask.all()


def test_chat_template_renders_image_items_and_default_system_prompt(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_each_placeholder_becomes_a_span_of_one_time_slot_plus_patches(processor):
    images = [PIL.Image.new("RGB", (10, 10), "red"), PIL.Image.new("RGB", (20, 5), "blue")]
    out = processor(text=["a <|image_pad|> b <|image_pad|>"], images=[images], return_tensors="pt")
    ids = out.input_ids[0]
    pad = processor.image_token_id
    assert (ids == pad).sum() == 2 * (1 + 2 * 3)  # fixed size 32x48: 2x3 patches per image
    assert out.pixel_values.shape == (2, 3, 32, 48)
    # the two spans are separate runs
    runs = torch.diff(torch.cat([torch.tensor([0]), (ids == pad).int(), torch.tensor([0])])).tolist()
    assert runs.count(1) == 2


def test_batch_chat_template_with_left_padding(processor):
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": PIL.Image.new("RGB", (8, 8))},
                    {"type": "text", "text": "What colour?"},
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": PIL.Image.new("RGB", (8, 8))},
                    {"type": "text", "text": "How many shapes are there in this image?"},
                ],
            }
        ],
    ]
    out = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    assert out.input_ids.shape[0] == 2 and out.pixel_values.shape[0] == 2
    assert out.attention_mask[0, 0] == 0 and out.attention_mask[:, -1].all()


def test_images_of_different_sizes_come_back_as_a_list(tokenizer):
    processor = build_processor(tokenizer)  # 512-class buckets
    images = [PIL.Image.new("RGB", (100, 100)), PIL.Image.new("RGB", (300, 100))]
    out = processor(
        text=["<|image_pad|>", "<|image_pad|>"], images=[[images[0]], [images[1]]], return_tensors="pt", padding=True
    )
    assert [tuple(p.shape) for p in out.pixel_values] == [(3, 512, 512), (3, 384, 672)]
    assert ((out.input_ids == processor.image_token_id).sum(1)).tolist() == [1 + 32 * 32, 1 + 24 * 42]


def test_placeholder_and_image_counts_must_match(processor):
    with pytest.raises(ValueError, match="2 image placeholders .* but 1 images"):
        processor(text="<|image_pad|> and <|image_pad|>", images=[PIL.Image.new("RGB", (8, 8))])
    with pytest.raises(ValueError, match="1 image placeholders .* but 0 images"):
        processor(text="<|image_pad|>")
    with pytest.raises(ValueError, match="0 image placeholders .* but 1 images"):
        processor(text="no image here", images=[PIL.Image.new("RGB", (8, 8))])


def test_saved_processor_pads_on_the_left_so_batched_generation_matches_one_by_one(tokenizer, model, tmp_path):
    """With no padding argument anywhere, a batch of chats of different lengths, one image each, generates what each
    chat generates alone: the processor saved with a model pads on the left."""
    build_processor(tokenizer, size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)

    def chat(colour, question):
        image = PIL.Image.new("RGB", (32, 32), colour)
        return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]

    conversations = [chat("red", "What colour?"), chat("blue", "How many shapes are there? Where is the square?")]
    template_kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    batch = processor.apply_chat_template(conversations, padding=True, **template_kwargs)
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[:, -1].all()
    with torch.no_grad():
        batched = model.generate(**batch, do_sample=False, max_new_tokens=5)[:, batch.input_ids.shape[1] :]
        for row, conversation in enumerate(conversations):
            alone = processor.apply_chat_template(conversation, **template_kwargs)
            expected = model.generate(**alone, do_sample=False, max_new_tokens=5)[0, alone.input_ids.shape[1] :]
            assert batched[row].tolist() == expected.tolist()


def test_a_tokenizer_created_with_a_padding_side_keeps_it(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    right = AutoTokenizer.from_pretrained(tmp_path, padding_side="right")
    assert build_processor(right).tokenizer.padding_side == "right"


def test_the_processor_leaves_the_tokenizer_it_is_handed_as_it_was():
    """Left padding is the processor's default, not a change made to the caller's tokenizer."""
    tokenizer = build_tokenizer()
    side, init_kwargs = tokenizer.padding_side, dict(tokenizer.init_kwargs)
    processor = Tuna2Processor(Tuna2ImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    assert processor.tokenizer is tokenizer
    assert side == "right" and tokenizer.padding_side == side and tokenizer.init_kwargs == init_kwargs
    batch = processor(text=["a", "a longer text"], padding=True, return_tensors="pt")
    assert batch.attention_mask.tolist()[0][:1] == [0] and batch.attention_mask[:, -1].all()
    assert tokenizer(["a", "a longer text"], padding=True).attention_mask[0][-1] == 0  # the tokenizer still pads right
