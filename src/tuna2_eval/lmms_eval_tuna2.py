"""Tuna-2 as an lmms-eval model (`--model tuna2`), answering with the model's batched `generate()`.

    lmms-eval --model tuna2 --model_args pretrained=<checkpoint folder>,dtype=bfloat16 --tasks ocrbench --batch_size 8

The prompt is the official evaluation's: the task's context without its `<image>` tags, after the first image, in a
user turn under Qwen's default system prompt; the image is resized directly to the nearest resolution bucket (the
processor's default), answers are greedy unless the task asks for sampling, stop at `<|im_end|>` and are stripped.
"""

import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

import transformers_tuna2  # noqa: F401  (registers Tuna-2 with the Auto classes)

IMAGE_TAG = "<image>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The official adapter's default when a task does not set `max_new_tokens`.
MAX_NEW_TOKENS = 512


class Tuna2(lmms):
    """
    Args (lmms-eval's `--model_args`):
        pretrained (`str`): a Tuna-2 checkpoint folder or hub id.
        device (`str`, *optional*): defaults to `cuda` when available, else `cpu`; with `accelerate launch`, each
            process takes `cuda:<local rank>` and a share of the documents.
        dtype (`str`, defaults to `"auto"`): `float32`, `bfloat16` or `float16`; `auto` is bfloat16 on CUDA (the
            official evaluation's precision) and float32 elsewhere.
        batch_size (`int`, defaults to 1): documents per `generate()` call, left-padded.
        max_new_tokens (`int`, defaults to 512): the longest answer when the task does not set one.
    """

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int | str = MAX_NEW_TOKENS,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"tuna2 does not take the model_args {', '.join(sorted(kwargs))}")
        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            self._device = torch.device(f"cuda:{accelerator.local_process_index}")
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        elif dtype in DTYPES:
            torch_dtype = DTYPES[dtype]
        else:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if self.batch_size_per_gpu < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be whole numbers >= 1")
        self._model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=torch_dtype).to(self._device)
        self._model.eval()
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.accelerator = accelerator
        self._rank = accelerator.local_process_index
        self._world_size = accelerator.num_processes

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def conversation(self, context: str, visuals: list) -> list[dict]:
        """The official evaluation prompt: the first image (Tuna-2 was evaluated on one image per question), then the
        context without its `<image>` tags; the chat template joins them with a newline and adds the system turn."""
        text = {"type": "text", "text": context.replace(IMAGE_TAG, "").strip()}
        images = [visual for visual in visuals if visual is not None][:1]
        return [{"role": "user", "content": [*({"type": "image", "image": image} for image in images), text]}]

    def generation_options(self, gen_kwargs: dict) -> dict:
        """The task's generation settings as `generate()` options. The task's `until` strings are not applied: the
        official evaluation stops at `<|im_end|>` only."""
        temperature = float(gen_kwargs.get("temperature") or 0)
        options = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": temperature > 0,
        }
        if options["do_sample"]:
            options["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        return options

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers, in the order of `requests`; documents with the same generation settings are batched, longest
        context first."""
        collator = utils.Collator(
            [request.args for request in requests], lambda args: (-len(args[0]), args[0]), grouping=True
        )
        answers = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
            conversations = []
            for context, doc_to_visual, doc_id, task, split in zip(contexts, doc_to_visuals, doc_ids, tasks, splits):
                visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
                conversations.append(self.conversation(context, visuals if isinstance(visuals, list) else [visuals]))
            inputs = self.processor.apply_chat_template(
                conversations,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"padding": True},
            ).to(self.device)
            with torch.inference_mode():
                output = self.model.generate(**inputs, **self.generation_options(dict(all_gen_kwargs[0])))
            texts = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for context, gen_kwargs, text in zip(contexts, all_gen_kwargs, texts):
                answers.append(text.strip())
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answers[-1])
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(answers)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("tuna2 answers generation tasks (output_type: generate_until) only")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("tuna2 answers single-round generation tasks only")
