"""Checkpoint conversion: official Tuna-2 checkpoints and Qwen2.5 models into the shared checkpoint folder (it needs
both libraries, hence its place here). The scripts in the repository's `conversion/` folder and `tuna2 convert` run
these modules."""
