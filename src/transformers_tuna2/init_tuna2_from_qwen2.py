"""Builds a new Tuna-2 from a Qwen2 / Qwen2.5(-Instruct) folder, initialised as the official code initialises one, and
writes the folder that `AutoModelForImageTextToText` and `AutoProcessor` load.

    python -m transformers_tuna2.init_tuna2_from_qwen2 --qwen /models/Qwen2.5-7B-Instruct --output ./tuna2-7b-init

With `--siglip`, a SigLIP (or fixed-resolution SigLIP2) checkpoint folder, it builds a Tuna-R, the paper's encoder
variant, instead: as the official Tuna-R 7B,

    python -m transformers_tuna2.init_tuna2_from_qwen2 --qwen /models/Qwen2.5-7B-Instruct \
        --siglip /models/siglip2-so400m-patch16-384 --siglip-image-size 512 --output ./tuna-r-7b-init

`tuna2 init` (and `conversion/init_from_qwen2.py`) runs this and adds the files of `Tuna2Pipeline`: `model_index.json`
and `scheduler/`.

- Language model: the Qwen2 weights. The tokenizer is set up as officially ([PAD], <image>, <|vid_start|>,
  <|vid_end|> added) and the embeddings and the LM head are resized to it as the official code resizes them, with
  `resize_token_embeddings(len(tokenizer))`: Qwen2.5-7B's 152064 rows are truncated to 151669; a smaller checkpoint
  vocabulary grows by rows drawn from the mean and covariance of the existing ones.
- Flow head: `--flow-head-layers` blocks (16) as wide as the LLM, with its MLP width, `hidden_size / 64` query heads
  and a quarter as many key/value heads: from Qwen2.5-7B, exactly the official Tuna-2 7B.
- Initialisation of the parts that do not come from the LLM, as the official model starts (the model's own
  `_init_weights`, which every new Tuna-2 starts from):
  - patch convolution: xavier-uniform weight, zero bias; every norm weight: ones;
  - timestep MLP: weights N(0, 0.02), biases PyTorch's default;
  - flow-head blocks: adaLN modulation zero (adaLN-Zero); attention and MLP linears keep PyTorch's default
    (kaiming-uniform). The official code means to xavier-initialise them, but calls its init on the module list
    instead of through `.apply`, so it never runs and the official model was trained from PyTorch's default. That is
    what is kept here, so that training with the official recipe starts where the official run started;
  - final layer: adaLN modulation and output projection zero, so that x0 is predicted as 0 at first;
  - mask token: normal with std hidden_size ** -0.5.
- Tuna-R (`--siglip`): the SigLIP vision weights up to `--vision-feature-layer` (-2: the second-to-last layer, 26 of
  so400m's 27), without the pooling head and the final LayerNorm, which the model does not have; the projector
  (RMSNorm, Linear, GELU, Linear) as officially: norm weight ones, the linears PyTorch's default (the official code
  means to xavier-initialise them, but calls its init on the `nn.Sequential`, where it does nothing, as for the
  flow-head blocks); no mask token (the official Tuna-R 7B has none). `--siglip-image-size` sets the size of the
  position table (the official 7B: 512, where the SigLIP2 checkpoint has 384). The official code then leaves the
  position table at its random initialisation (its shape no longer matches); here the pretrained table is resampled
  bicubically to the new grid, as the encoder itself resamples it for any other image size, so that the encoder
  starts as the pretrained one. A whole SigLIP checkpoint (text model too, as SigLIP2 is published) is taken as well.
- `--output-layout patch` (the default for new models) is the standard un-patchify; `raster` is the official
  flattening, needed only to match official weights.
"""

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2ForCausalLM, SiglipVisionModel

from .configuration_tuna2 import OUTPUT_LAYOUTS, Tuna2Config
from .convert_tuna2_weights_to_hf import (
    DTYPES,
    check_output_folder,
    load_official_tokenizer,
    load_text_config,
    load_vision_config,
    run_command,
    tuna2_config,
    tuna2_processor,
    understanding_generation_config,
)
from .modeling_tuna2 import Tuna2ForConditionalGeneration, truncated_vision_tower
from .processing_tuna2 import Tuna2Processor

FLOW_HEAD_HEAD_DIM = 64  # the official flow head's 3-D RoPE is built for 64 channels per head
FLOW_HEAD_QUERIES_PER_KEY = 4  # 56 query and 14 key/value heads in the official 7B
LOADING_PROBLEMS = {"missing": "missing_keys", "unexpected": "unexpected_keys", "wrong shape": "mismatched_keys"}
SIGLIP_POSITIONS = "embeddings.position_embedding.weight"


def flow_head_shape(hidden_size: int, intermediate_size: int, num_layers: int) -> dict:
    """The official rule for the flow head's shape, from the LLM's width and MLP width."""
    if hidden_size % FLOW_HEAD_HEAD_DIM:
        raise ValueError(f"the LLM's hidden size {hidden_size} is not a multiple of {FLOW_HEAD_HEAD_DIM}")
    num_heads = hidden_size // FLOW_HEAD_HEAD_DIM
    grouped = num_heads % FLOW_HEAD_QUERIES_PER_KEY == 0
    return dict(
        flow_head_num_layers=num_layers,
        flow_head_num_attention_heads=num_heads,
        flow_head_num_key_value_heads=num_heads // FLOW_HEAD_QUERIES_PER_KEY if grouped else num_heads,
        flow_head_head_dim=FLOW_HEAD_HEAD_DIM,
        flow_head_intermediate_size=intermediate_size,
    )


def load_qwen2(qwen_path: str | Path, dtype: torch.dtype | None) -> Qwen2ForCausalLM:
    """The Qwen2ForCausalLM of `qwen_path`; raises a `ValueError` unless the folder holds exactly its weights."""
    qwen, loading_info = Qwen2ForCausalLM.from_pretrained(qwen_path, dtype=dtype, output_loading_info=True)
    problems = {title: list(loading_info[key]) for title, key in LOADING_PROBLEMS.items() if loading_info[key]}
    if problems:
        details = "; ".join(f"{title}: {keys}" for title, keys in problems.items())
        raise ValueError(f"{qwen_path} does not hold the weights of a Qwen2ForCausalLM ({details})")
    return qwen


@torch.no_grad()
def pretrained_vision_tower(siglip_path: str | Path, config: Tuna2Config, dtype: torch.dtype) -> SiglipVisionModel:
    """Tuna-R's truncated SigLIP tower (`config.vision_config`, `config.vision_feature_layer`) with the weights of the
    SigLIP checkpoint `siglip_path`; a position table of another size is the pretrained one, resampled bicubically
    to the new grid. `siglip_path` holds a SigLIP vision model, or a whole SigLIP (its text model left out). Raises a
    `ValueError` unless it holds every weight of the vision model, with its shape."""
    siglip, loading_info = SiglipVisionModel.from_pretrained(siglip_path, dtype=dtype, output_loading_info=True)
    # A whole SigLIP checkpoint (as SigLIP2 is published) also holds the text model: its weights are left out.
    problems = {
        title: list(loading_info[key])
        for title, key in LOADING_PROBLEMS.items()
        if loading_info[key] and key != "unexpected_keys"
    }
    if problems:
        details = "; ".join(f"{title}: {keys}" for title, keys in problems.items())
        raise ValueError(f"{siglip_path} does not hold the weights of a SigLIP vision model ({details})")
    with torch.device("cpu"):
        tower = truncated_vision_tower(config).to(dtype)
    wanted = tower.state_dict()
    weights = {key: value for key, value in siglip.state_dict().items() if key in wanted}
    grid = config.vision_config.image_size // config.vision_config.patch_size
    if weights[SIGLIP_POSITIONS].shape != wanted[SIGLIP_POSITIONS].shape:
        probe = weights[SIGLIP_POSITIONS].new_zeros(1, grid * grid, weights[SIGLIP_POSITIONS].shape[1])
        size = config.vision_config.image_size
        weights[SIGLIP_POSITIONS] = siglip.embeddings.interpolate_pos_encoding(probe, size, size)[0]
    tower.load_state_dict(weights, strict=True)
    return tower


@torch.no_grad()
def initialise_new_parts(model: Tuna2ForConditionalGeneration, dtype: torch.dtype):
    """Creates, part by part in fp32 and then cast to `dtype`, everything that does not come from the LLM (or, for
    Tuna-R, from SigLIP), with the model's own initialisation, `_init_weights`, which is the official one (see the
    module docstring)."""
    is_tuna_r = model.config.vision_config is not None
    image_embedding = model.model.multi_modal_projector if is_tuna_r else model.model.patch_embed
    parts = [image_embedding, model.model.time_embed, *model.flow_head.layers, model.flow_head.final_layer]
    for part in parts:
        part.to_empty(device="cpu")
        part.apply(model._init_weights)
        part.to(dtype)
    if model.config.use_mask_token:
        model.model.mask_token = nn.Parameter(torch.empty(1, 1, model.config.text_config.hidden_size, dtype=dtype))
        model._init_weights(model.model)  # the mask token
    still_meta = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if still_meta:
        raise RuntimeError(f"weights left uninitialised: {still_meta}")


def init_from_qwen2(
    qwen_path: str | Path,
    output_layout: str = "patch",
    flow_head_layers: int = 16,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    siglip_path: str | Path | None = None,
    siglip_image_size: int | None = None,
    vision_feature_layer: int = -2,
) -> tuple[Tuna2ForConditionalGeneration, Tuna2Processor]:
    """A new Tuna-2 on the Qwen2 model of `qwen_path`, in `dtype` (default: the Qwen2 checkpoint's). With
    `siglip_path`, a Tuna-R on the SigLIP vision model of that folder, read at `vision_feature_layer`, with a position
    table for `siglip_image_size` pixels (default: the checkpoint's)."""
    torch.manual_seed(seed)
    tokenizer = load_official_tokenizer(qwen_path)
    text_config = load_text_config(qwen_path)
    dtype = dtype or text_config.dtype or torch.float32
    qwen = load_qwen2(qwen_path, dtype)
    qwen.resize_token_embeddings(len(tokenizer))  # the official call: truncates, or grows with mean-resizing
    shape = flow_head_shape(text_config.hidden_size, text_config.intermediate_size, flow_head_layers)
    vision = {}
    if siglip_path is not None:
        vision_config = load_vision_config(siglip_path)
        if siglip_image_size is not None:
            vision_config.image_size = siglip_image_size
        vision = dict(
            vision_config=vision_config,
            vision_feature_layer=vision_feature_layer,
            patch_size=vision_config.patch_size,
            num_channels=vision_config.num_channels,
            use_mask_token=False,
        )
    config = tuna2_config(qwen.config, tokenizer, output_layout=output_layout, **shape, **vision)
    with torch.device("meta"):
        model = Tuna2ForConditionalGeneration(config)
    # The language model's modules are taken over as they are: no copy of the LLM weights.
    model.model.language_model = qwen.model
    model.lm_head = qwen.lm_head
    if siglip_path is not None:
        model.model.vision_tower = pretrained_vision_tower(siglip_path, config, dtype)
    initialise_new_parts(model, dtype)
    model.generation_config = understanding_generation_config(config, tokenizer)
    return model.eval(), tuna2_processor(tokenizer, config)


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--qwen", required=True, help="Qwen2 / Qwen2.5(-Instruct) folder: weights, config, tokenizer")
    parser.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument("--output-layout", choices=OUTPUT_LAYOUTS, default="patch", help="default: patch")
    parser.add_argument("--flow-head-layers", type=int, default=16, help="flow-head blocks (default: 16)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the dtype of the Qwen2 checkpoint")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: 5GB)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new parts' initialisation (default: 0)")
    parser.add_argument("--siglip", help="build a Tuna-R on this SigLIP (or fixed-resolution SigLIP2) folder")
    parser.add_argument(
        "--siglip-image-size",
        type=int,
        help="Tuna-R: image size of the position table (default: the SigLIP checkpoint's; the official 7B: 512)",
    )
    parser.add_argument(
        "--vision-feature-layer",
        type=int,
        default=-2,
        help="Tuna-R: the SigLIP layer read, the later ones dropped (default: -2, the second-to-last)",
    )
    args = parser.parse_args(argv)
    args.prog = parser.prog
    return args


def run(args: argparse.Namespace) -> str:
    """Builds and writes the model as `args` (from `parse_args`) say; returns what to print. Bad input raises
    `ValueError` or `OSError`."""
    output = Path(args.output)
    check_output_folder(output)
    if args.flow_head_layers < 1:
        raise ValueError(f"--flow-head-layers must be >= 1, got {args.flow_head_layers}")
    model, processor = init_from_qwen2(
        args.qwen,
        output_layout=args.output_layout,
        flow_head_layers=args.flow_head_layers,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        seed=args.seed,
        siglip_path=args.siglip,
        siglip_image_size=args.siglip_image_size,
        vision_feature_layer=args.vision_feature_layer,
    )
    model.save_pretrained(output, max_shard_size=args.max_shard_size)
    processor.save_pretrained(output)
    return f"Wrote {output}: {model.num_parameters():,} parameters"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Runs the command line (`prog` names it in the usage and errors: `tuna2 init`); returns the exit code."""
    return run_command(run, parse_args(argv, prog))


if __name__ == "__main__":
    sys.exit(main())
