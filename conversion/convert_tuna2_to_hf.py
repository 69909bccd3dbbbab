"""Converts an official Tuna-2 checkpoint into the shared checkpoint folder of transformers and diffusers.

Run `python conversion/convert_tuna2_to_hf.py --help` for the options (also `tuna2 convert`);
the code lives in `diffusers_tuna2.conversion.convert_tuna2_to_hf`.
"""

import sys

from diffusers_tuna2.conversion.convert_tuna2_to_hf import main

if __name__ == "__main__":
    sys.exit(main())
