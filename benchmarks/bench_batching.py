"""Training throughput of mixed batches vs one task per micro-batch (`Tuna2MixtureDataset(task_batch_size=...)`).

    python benchmarks/bench_batching.py                 # the shapes demo's model and data, 60 steps each

Both runs train the untrained shapes-demo Tuna-2 (examples/shapes/init_model.py) on the same three streams (t2i,
understanding, edit; equal weights) with TRL's trainer, batch 16, in this process. Mixed batches pad every row to the
longest one (understanding rows are several times longer than generation rows); grouped micro-batches hold one task
each and take turns. Reports samples/s (the trainer's own figure) and the share of padding tokens.
"""

import argparse
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
from trl import SFTConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "shapes"))
import init_model  # noqa: E402
import make_data  # noqa: E402

from transformers_tuna2 import Tuna2ForConditionalGeneration  # noqa: E402
from transformers_tuna2.processing_tuna2 import Tuna2Processor  # noqa: E402
from tuna2_training.data import Tuna2Collator, Tuna2MixtureDataset, read_jsonl  # noqa: E402
from tuna2_training.trainer import Tuna2SFTTrainer  # noqa: E402


def run(mode: str, folder: Path, data: dict, steps: int, batch_size: int) -> dict:
    streams = {task: read_jsonl(path, task) for task, path in data.items()}
    grouped = mode == "one task per micro-batch"
    dataset = Tuna2MixtureDataset(
        streams, length=steps * batch_size, seed=0, task_batch_size=batch_size if grouped else None
    )
    processor = Tuna2Processor.from_pretrained(folder)
    collator = Tuna2Collator(processor, image_size=64)
    tokens = padding = 0
    for start in range(0, len(dataset), batch_size):
        mask = collator([dataset[i] for i in range(start, start + batch_size)])["attention_mask"]
        tokens, padding = tokens + mask.numel(), padding + int((mask == 0).sum())
    torch.manual_seed(0)
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-3,
        gradient_checkpointing=False,  # as examples/sft.py by default
        logging_steps=steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        train_sampling_strategy="sequential" if grouped else "random",
    )
    trainer = Tuna2SFTTrainer(
        model=Tuna2ForConditionalGeneration.from_pretrained(folder),
        args=config,
        train_dataset=dataset.to_hf_dataset(),
        data_collator=collator,
        processing_class=processor,
    )
    metrics = trainer.train().metrics
    return {"samples/s": metrics["train_samples_per_second"], "padding": padding / tokens}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp())
    data = make_data.build(work / "data", seed=0, num_t2i=300, num_mmu=300, num_edit=300)
    folder = work / "init"
    sys.argv = ["init_model.py", "--data", str(work / "data"), "--output", str(folder)]
    init_model.main()
    print(
        f"{date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, batch {args.batch_size}, {args.steps} steps"
    )
    print("| batches | samples/s | padding tokens |\n|---|---|---|")
    for mode in ("mixed", "one task per micro-batch"):
        result = run(mode, folder, data, args.steps, args.batch_size)
        print(f"| {mode} | {result['samples/s']:.1f} | {result['padding']:.0%} |")


if __name__ == "__main__":
    main()
