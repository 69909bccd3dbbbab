"""Converts an official Tuna-2 checkpoint into the shared checkpoint folder of transformers and diffusers.

Run `python conversion/convert_tuna2_to_hf.py --help` for the options (also `tuna2 convert`); the conversion lives
in `transformers_tuna2.convert_tuna2_weights_to_hf`, and `diffusers_tuna2.conversion` adds the pipeline's files.
"""

import sys

from diffusers_tuna2.conversion import convert_main

if __name__ == "__main__":
    sys.exit(convert_main())
