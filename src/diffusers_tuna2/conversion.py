"""`tuna2 convert` and `tuna2 init`: the checkpoint converters of `transformers_tuna2`, followed by the files that
`Tuna2Pipeline` adds to a transformers checkpoint folder (`scheduler/` and `model_index.json`), so that the folder
holds both libraries' files. The scripts in the repository's `conversion/` folder run these too."""

import os
from pathlib import Path
from types import ModuleType

import torch

from transformers_tuna2 import Tuna2Config, Tuna2ForConditionalGeneration, Tuna2Processor
from transformers_tuna2 import convert_tuna2_weights_to_hf as weights_converter
from transformers_tuna2 import init_tuna2_from_qwen2 as initializer


def save_pipeline_files(folder: str | os.PathLike):
    """Writes `scheduler/` and `model_index.json` (the default scheduler and sampling settings) into a Tuna-2
    checkpoint folder written by transformers. The weights are not loaded: the model is built on the meta device."""
    from .pipeline_tuna2 import Tuna2Pipeline  # diffusers, imported once there is a folder: --help stays quicker

    folder = Path(folder)
    with torch.device("meta"):
        model = Tuna2ForConditionalGeneration(Tuna2Config.from_pretrained(folder))
    processor = Tuna2Processor.from_pretrained(folder)
    Tuna2Pipeline(model=model, processor=processor).save_scheduler_and_index(folder)


def run_with_pipeline_files(script: ModuleType, argv: list[str] | None, prog: str | None) -> int:
    """Runs a converter's command line (`parse_args`, then `run`), then adds the pipeline files to its output folder;
    bad input is reported in one line, as the converter reports it. Returns the exit code."""

    def run_and_add_pipeline_files(args) -> str:
        message = script.run(args)
        save_pipeline_files(args.output)
        return message

    return weights_converter.run_command(run_and_add_pipeline_files, script.parse_args(argv, prog))


def convert_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`tuna2 convert`: an official checkpoint into a folder for both libraries (`prog` names the command in the
    usage and errors)."""
    return run_with_pipeline_files(weights_converter, argv, prog)


def init_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`tuna2 init`: a new Tuna-2 from Qwen2.5, in a folder for both libraries."""
    return run_with_pipeline_files(initializer, argv, prog)
