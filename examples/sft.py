"""Fine-tune Tuna-2 (LoRA or full) on any mix of text-to-image, understanding, editing and text-only data with TRL.

    python examples/sft.py --model ./tuna2-7b --data t2i=my_t2i.jsonl mmu=my_vqa.jsonl edit=my_edit.jsonl \\
        --lora-r 16 --output ./tuna2-lora
    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/sft.py ... --no-lora

Streams are the official jsonl formats (`t2i`, `mmu`, `edit`, `text`; image paths relative to the jsonl's folder or
`--image-root`), or Hugging Face datasets with `messages` and `images` columns (`--hf-dataset`). Each training
sample is drawn from a stream with the `--weights` probabilities (official defaults t2i 0.5, edit 0.2, mmu 0.2,
text 0.1). With LoRA the output folder holds the adapter; with `--no-lora` it is a full checkpoint folder that
`AutoModelForImageTextToText` and `Tuna2Pipeline` load.

`--train-only PATTERN ...` / `--train-only-file FILE` train only the named parameters (name prefixes or regular
expressions; the file is what `tuna2 convert --report --fresh-layers-out FILE` writes): with `--no-lora` every other
parameter is frozen; with LoRA the named ones train fully and the adapters train on the rest. `--ema-decay` keeps
an EMA of the trained weights: every `checkpoint-N` holds the raw weights and the EMA (in `ema/`), and the output
folder the EMA weights (the official restore recipe: docs/training.md). `--resume-from-checkpoint` goes on from a
`checkpoint-N` folder: weights, optimizer, data position and EMA.
"""

import argparse
import json
import logging
import math
import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback, set_seed
from trl import SFTConfig

import transformers_tuna2  # noqa: F401  (registers Tuna-2 with the Auto classes)
from diffusers_tuna2.cli import HelpFormatter
from diffusers_tuna2.user_inputs import CommandError, check_checkpoint, resolve_model
from tuna2_training.data import Tuna2Collator, Tuna2DataError, Tuna2MixtureDataset, read_hf_dataset, read_jsonl
from tuna2_training.train_only import freeze_all_but, modules_to_save, read_patterns_file
from tuna2_training.trainer import LORA_TARGETS, Tuna2SFTTrainer, lora_target_modules

logger = logging.getLogger("sft")

OFFICIAL_WEIGHTS = {"t2i": 0.5, "edit": 0.2, "mmu": 0.2, "text": 0.1}


def key_values(pairs: list[str], option: str, convert=str) -> dict:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"error: {option} expects name=value pairs, got {pair!r}")
        try:
            result[key] = convert(value)
        except ValueError:
            raise SystemExit(f"error: {option}: {value!r} is not a valid value for {key}") from None
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="Tuna-2 checkpoint folder or hub id")
    parser.add_argument("--data", nargs="+", default=[], metavar="TASK=JSONL", help="t2i=, mmu=, edit=, text= streams")
    parser.add_argument("--image-root", nargs="*", default=[], metavar="TASK=DIR", help="image folder per stream")
    parser.add_argument("--hf-dataset", default=None, help="a datasets folder/hub id with messages + images columns")
    parser.add_argument("--hf-split", default="train", help="split of --hf-dataset")
    parser.add_argument("--weights", nargs="*", default=[], metavar="TASK=W", help="stream sampling weights")
    parser.add_argument("--output", required=True, help="folder to write the adapter or checkpoint to")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output folder that is not empty")
    parser.add_argument("--no-lora", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=None, help="defaults to 2 * r")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA inputs")
    parser.add_argument(
        "--lora-targets", choices=sorted(LORA_TARGETS), default="all", help="modules that get adapters"
    )
    parser.add_argument(
        "--train-only",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="train only the parameters whose name starts with or fully matches (regex) a PATTERN; with LoRA they "
        "train fully besides the adapters",
    )
    parser.add_argument(
        "--train-only-file",
        metavar="FILE",
        help="--train-only patterns, one a line (from tuna2 convert --fresh-layers-out)",
    )
    parser.add_argument(
        "--ema-decay", type=float, default=None, help="save the EMA of the trained weights (official: 0.9999)"
    )
    parser.add_argument(
        "--ema-warmup", action="store_true", help="EMA decay min(ema_decay, n / (n + 9)) at step n (short runs)"
    )
    parser.add_argument(
        "--ema-on-cpu",
        action="store_true",
        help="keep the EMA (float32, 4 bytes per trained weight) in CPU memory instead of on the GPU",
    )
    parser.add_argument(
        "--resume-from-checkpoint",
        metavar="FOLDER",
        default=None,
        help="go on from a checkpoint-N folder of --output, or 'last' for the latest one",
    )
    parser.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=1, help="per device")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step")
    parser.add_argument(
        "--group-by-task",
        action="store_true",
        help="one task per micro-batch (little padding), tasks taking turns by weight; with gradient accumulation, "
        "each optimizer step sums micro-batches of different tasks",
    )
    parser.add_argument("--learning-rate", type=float, default=2e-5, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    parser.add_argument(
        "--lr-scheduler",
        choices=["constant_with_warmup", "cosine", "linear"],
        default="constant_with_warmup",
        help="official: constant after a linear warmup",
    )
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (official: 1.0)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="fixed size of generated images (default: the checkpoint processor's size, else buckets)",
    )
    parser.add_argument("--resolution", choices=["512", "1024"], default="512", help="bucket class")
    parser.add_argument("--caption-dropout", type=float, default=0.0, help="empty-prompt rate for t2i/edit (CFG)")
    parser.add_argument(
        "--P-mean",
        type=float,
        default=None,
        help="training times t = sigmoid(N(P_mean, P_std)); lower trains more at high noise (default: the "
        "checkpoint's, official -0.8); a --no-lora checkpoint saves it in its config",
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in the backward (less memory)"
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data mixture, dropout and initialisation")
    parser.add_argument("--logging-steps", type=int, default=10, help="log the losses every N steps")
    parser.add_argument("--save-steps", type=int, default=500, help="write a checkpoint-N folder every N steps")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--skip-bad-samples", action="store_true", help="skip broken samples with a warning")
    parser.add_argument("--report-to", default="none", help="trackers to log to (wandb, tensorboard, ...)")
    parser.add_argument("--loss-log", default=None, help="write every rank's logged losses to this json (per rank)")
    return parser.parse_args(argv)


def load_streams(args) -> dict:
    files = key_values(args.data, "--data")
    roots = key_values(args.image_root, "--image-root")
    unknown = sorted((set(files) | set(roots)) - set(OFFICIAL_WEIGHTS))
    if unknown:
        raise SystemExit(f"error: unknown stream(s) {unknown}; use {sorted(OFFICIAL_WEIGHTS)}")
    streams = {}
    for task, path in files.items():
        if not Path(path).is_file():
            raise SystemExit(f"error: {task} data file not found: {path}")
        streams[task] = read_jsonl(path, task, roots.get(task), skip_bad_samples=args.skip_bad_samples)
    if args.hf_dataset:
        import datasets

        dataset = datasets.load_dataset(args.hf_dataset, split=args.hf_split)
        for sample in read_hf_dataset(dataset, args.hf_dataset, skip_bad_samples=args.skip_bad_samples):
            streams.setdefault(sample.task, []).append(sample)
    if not streams:
        raise SystemExit("error: no training data: pass --data and/or --hf-dataset")
    return streams


def check_arguments(args):
    """Fails before anything is loaded on a --model that is no checkpoint, on an --output that already holds files
    (which training would overwrite) and on a --P-mean that is not a number."""
    try:
        model = resolve_model(args.model)
        check_checkpoint(model)
    except CommandError as error:
        raise SystemExit(f"error: --model: {error}") from None
    args.model = str(model)
    if args.P_mean is not None and not math.isfinite(args.P_mean):
        raise SystemExit(f"error: --P-mean must be a finite number, got {args.P_mean}")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise SystemExit(f"error: --output {args.output} is a file; give a folder")
    if output.is_dir() and any(output.iterdir()) and not (args.overwrite or args.resume_from_checkpoint):
        raise SystemExit(f"error: --output {args.output} is not empty; pass --overwrite to write into it")


def main(argv=None):
    args = parse_args(argv)
    check_arguments(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # PEFT reads the model's `is_gradient_checkpointing`, which transformers renamed: a warning about an option that
    # the user may not have given.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    set_seed(args.seed)
    try:
        streams = load_streams(args)
    except Tuna2DataError as error:
        raise SystemExit(f"error: {error}") from None
    weights = {**OFFICIAL_WEIGHTS, **key_values(args.weights, "--weights", float)}
    samples_needed = args.max_steps * args.batch_size * args.gradient_accumulation_steps
    dataset = Tuna2MixtureDataset(
        streams,
        weights,
        length=samples_needed,
        seed=args.seed,
        skip_bad_samples=args.skip_bad_samples,
        task_batch_size=args.batch_size if args.group_by_task else None,
    )

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype)
    if args.P_mean is not None:
        model.config.P_mean = args.P_mean
    processor = AutoProcessor.from_pretrained(args.model)
    train_only = list(args.train_only)
    try:
        if args.train_only_file:
            train_only += read_patterns_file(args.train_only_file)
        peft_config = None
        if not args.no_lora:
            from peft import LoraConfig

            # The named modules train fully (PEFT keeps and saves a trained copy) and get no adapter.
            full_modules = modules_to_save(model, train_only) if train_only else None
            peft_config = LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha or 2 * args.lora_r,
                lora_dropout=args.lora_dropout,
                target_modules=lora_target_modules(args.lora_targets),
                exclude_modules=full_modules,
                modules_to_save=full_modules,
            )
        elif train_only:
            trained = freeze_all_but(model, train_only)
            count = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
            logger.info(f"training {len(trained)} parameter tensors ({count:,} values); the others are frozen")
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None

    config = SFTConfig(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler_type=args.lr_scheduler,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        seed=args.seed,
        bf16=args.bf16,
        # TRL defaults `gradient_checkpointing`, transformers' deprecated name, to True: set the new name alone.
        gradient_checkpointing=None,
        activation_checkpointing=args.gradient_checkpointing,
        # Reentrant checkpointing gives no gradient to a layer whose input does not require one (frozen layers below).
        activation_checkpointing_kwargs=(
            {"use_reentrant": False} if train_only and args.gradient_checkpointing else None
        ),
        dataloader_num_workers=args.num_workers,
        # The mixture dataset shuffles by itself; read in order, its task blocks stay whole micro-batches.
        train_sampling_strategy="sequential" if args.group_by_task else "random",
        use_cpu=not torch.cuda.is_available(),
        report_to=args.report_to,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        # Batches without a generated image leave the flow head out of the graph.
        ddp_find_unused_parameters=True,
        max_length=None,
    )
    trainer = Tuna2SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset.to_hf_dataset(),
        data_collator=Tuna2Collator(
            processor,
            image_size=args.image_size,
            resolution=args.resolution,
            caption_dropout=args.caption_dropout,
            seed=args.seed,
        ),
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[SavePipelineFiles(args.model)] if args.no_lora else None,
        ema_decay=args.ema_decay,
        ema_warmup=args.ema_warmup,
        ema_device="cpu" if args.ema_on_cpu else None,
    )
    resume = args.resume_from_checkpoint
    try:
        trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    except Tuna2DataError as error:
        raise SystemExit(f"error: {error}") from None

    if args.loss_log:
        losses = [entry for entry in trainer.state.log_history if "loss" in entry]
        path = Path(f"{args.loss_log}.rank{trainer.accelerator.process_index}.json")
        path.write_text(json.dumps(losses))
    trainer.accelerator.wait_for_everyone()
    save(trainer, processor, args)


class SavePipelineFiles(TrainerCallback):
    """Full fine-tuning: every `checkpoint-N` folder also gets `scheduler/` and `model_index.json` (the input
    checkpoint's default negative prompts), so that `Tuna2Pipeline.from_pretrained` loads it as it is."""

    def __init__(self, model_path: str):
        self.model_path = model_path

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_pipeline_files(model, processing_class, self.model_path, folder)


def save_pipeline_files(model, processor, model_path: str, folder):
    """`scheduler/` and `model_index.json` with the input checkpoint's sampling defaults (negative prompts,
    guidance scales)."""
    from diffusers_tuna2 import Tuna2Pipeline

    defaults = Tuna2Pipeline.sampling_defaults(model_path)
    Tuna2Pipeline(model=model, processor=processor, **defaults).save_scheduler_and_index(folder)


def save_diffusers_lora(folder):
    """The PEFT adapter in `folder` also as diffusers' `pytorch_lora_weights.safetensors` (keys `model.<module>...`,
    the LoRA config in the file's metadata), beside it: what `Tuna2Pipeline.load_lora_weights` loads first."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    from diffusers_tuna2 import Tuna2Pipeline

    config = LoraConfig.from_pretrained(folder)
    if config.modules_to_save:
        logger.warning(
            "no pytorch_lora_weights.safetensors: the adapter also holds fully trained layers (--train-only), which "
            "the diffusers LoRA format does not carry; load the PEFT folder"
        )
        return
    layers = {key.removeprefix("base_model.model."): value for key, value in load_peft_weights(folder).items()}
    Tuna2Pipeline.save_lora_weights(folder, model_lora_layers=layers, model_lora_adapter_metadata=config.to_dict())


def save(trainer: Tuna2SFTTrainer, processor, args):
    """LoRA: the adapter (PEFT folder and diffusers file) and the processor. Full fine-tuning: the shared checkpoint
    folder of both libraries."""
    trainer.save_model(args.output)  # gathers FSDP shards when needed; with PEFT, writes the adapter only
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(args.output)
        if args.no_lora:
            model = trainer.accelerator.unwrap_model(trainer.model)
            save_pipeline_files(model, processor, args.model, args.output)
        else:
            save_diffusers_lora(args.output)


if __name__ == "__main__":
    sys.exit(main())
