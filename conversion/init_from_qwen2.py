"""Creates a new Tuna-2 from a Qwen2.5 checkpoint, in the shared checkpoint folder.

Run `python conversion/init_from_qwen2.py --help` for the options (also `tuna2 init`); the code lives in
`transformers_tuna2.init_tuna2_from_qwen2`, and `diffusers_tuna2.conversion` adds the pipeline's files.
"""

import sys

from diffusers_tuna2.conversion import init_main

if __name__ == "__main__":
    sys.exit(init_main())
