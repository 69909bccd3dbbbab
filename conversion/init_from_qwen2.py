"""Creates a new Tuna-2 from a Qwen2.5 checkpoint, in the shared checkpoint folder.

Run `python conversion/init_from_qwen2.py --help` for the options (also `tuna2 init`);
the code lives in `diffusers_tuna2.conversion.init_from_qwen2`.
"""

import sys

from diffusers_tuna2.conversion.init_from_qwen2 import main

if __name__ == "__main__":
    sys.exit(main())
