"""Training Tuna-2: data readers and the collator (`.data`), the TRL trainer and LoRA targets (`.trainer`), the EMA
of trained weights (`.ema`), training named parameters only (`.train_only`), tokenizer training (`.tokenizer`) and
tiny models for tests, benchmarks and examples (`.tiny`), on top of `transformers_tuna2`.

Import the modules themselves: only `.trainer` loads TRL (`pip install "tuna2-hf[train]"`), and datasets comes with
`Tuna2MixtureDataset.to_hf_dataset`."""
