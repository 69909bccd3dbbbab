"""Training Tuna-2: data readers and the collator (`.data`), the TRL trainer and LoRA targets (`.trainer`), tokenizer
training (`.tokenizer`) and tiny models for tests, benchmarks and examples (`.tiny`), on top of `transformers_tuna2`.

Names are imported on first access, so that importing this package loads none of TRL, PEFT or datasets: TRL comes
with the trainer (`pip install "tuna2-hf[train]"`), datasets with `Tuna2MixtureDataset.to_hf_dataset`."""

import importlib

_LAZY_IMPORTS = {
    "Tuna2Collator": ".data",
    "Tuna2DataError": ".data",
    "Tuna2MixtureDataset": ".data",
    "Tuna2Sample": ".data",
    "read_hf_dataset": ".data",
    "read_jsonl": ".data",
    "LORA_TARGETS": ".trainer",
    "Tuna2SFTTrainer": ".trainer",
    "lora_target_modules": ".trainer",
    "train_byte_level_tokenizer": ".tokenizer",
}

__all__ = sorted(_LAZY_IMPORTS)


def __getattr__(name: str):
    if name not in _LAZY_IMPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_IMPORTS[name], __name__), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
