"""Sampling defaults of `Tuna2Pipeline` (the official ones) and of the `tuna2` command and app, light enough to
import for `tuna2 --help`."""

NUM_INFERENCE_STEPS = 50
GUIDANCE_SCALE = 3.0  # text-to-image
EDIT_GUIDANCE_SCALE = 2.0
SAMPLING_METHOD = "euler"
# Tuna-R (scripts/launch/predict.sh, --variant siglip_pixel)
TUNA_R_GUIDANCE_SCALE = 4.0
TUNA_R_EDIT_GUIDANCE_SCALE = 5.0
TUNA_R_SAMPLING_METHOD = "heun"
IMAGE_SIZE = 512  # when the processor has no fixed size
LORA_SCALE = 1.0  # `tuna2 generate/edit --lora`: the adapter's weight
MAX_NEW_TOKENS = 64  # the longest answer of `tuna2 ask` and of the app's Ask tab
