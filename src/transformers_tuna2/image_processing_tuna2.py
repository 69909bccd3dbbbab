"""Tuna-2 image processor: any image -> RGB at a resolution bucket -> values in [-1, 1], and back."""

import os

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import PILImageResampling, load_image
from transformers.processing_utils import ImagesKwargs

from .image_utils import stack_if_same_size

# Resolution buckets as (height, width), in the official order (ties go to the first).
BUCKETS = {
    "512": ((512, 512), (448, 576), (576, 448), (384, 672), (672, 384)),
    "1024": ((1024, 1024), (896, 1152), (1152, 896), (768, 1344), (1344, 768)),
}
RESIZE_MODES = ("resize", "center_crop")
# The official scaling to [-1, 1]: `(v / 255 - 0.5) / 0.5` per channel.
OFFICIAL_RESCALE_FACTOR = 1 / 255
OFFICIAL_MEAN = (0.5, 0.5, 0.5)
OFFICIAL_STD = (0.5, 0.5, 0.5)
# The options of transformers' image processors that Tuna-2's honours besides `size` and `return_tensors` (the
# others, such as a center crop or padding, have no meaning for it).
SUPPORTED_OPTIONS = (
    "do_convert_rgb",
    "do_resize",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class Tuna2ImageProcessorKwargs(ImagesKwargs, total=False):
    """The options of a [`Tuna2ImageProcessor`] call, which a [`Tuna2Processor`] call passes on."""

    resolution: str
    resize_mode: str


def refuse_options(names) -> None:
    """Raises naming the options given that Tuna-2 does not honour (`do_center_crop`, `do_pad`...) instead of
    ignoring them."""
    if names:
        listed = ", ".join(f"`{name}`" for name in sorted(names))
        raise ValueError(f"Tuna2ImageProcessor does not support {listed}")


def nearest_bucket(height: int, width: int, resolution: str = "512") -> tuple[int, int]:
    """The bucket whose aspect ratio W/H is closest to the image's (official rule; ties go to the first)."""
    if resolution not in BUCKETS:
        raise ValueError(f"resolution must be one of {sorted(BUCKETS)}, got {resolution!r}")
    return min(BUCKETS[resolution], key=lambda bucket: abs(bucket[1] / bucket[0] - width / height))


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode to 8-bit RGB; 16-bit greyscale is rescaled instead of clipped, and transparency is composited
    onto white (dropping the alpha channel would turn transparent pixels black, or whatever colour they hold)."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = PIL.Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def to_pil(image) -> PIL.Image.Image:
    """A PIL image, an `(H, W[, C])` numpy array or a `(C, H, W)` tensor (uint8, or float in [0, 1]) -> PIL. A string
    (URL, local path or base64, as in chat messages) is loaded with transformers' `load_image`."""
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if isinstance(image, str):
        try:
            return load_image(image)
        except ValueError as error:  # transformers' message quotes the whole string, which may be long base64 data
            raise ValueError(
                f"unsupported image type: {image[:80]!r} is not an image URL, an existing file or base64 data"
            ) from error
    if isinstance(image, torch.Tensor):
        if image.ndim != 3:
            raise ValueError(f"an image tensor must have shape (channels, height, width), got {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"unsupported image type {type(image).__name__}: pass PIL images, numpy arrays or tensors")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise ValueError(f"an image array must have shape (height, width[, 3 or 4]), got {image.shape}")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"image arrays must be uint8, or float in [0, 1]; got {image.dtype}")
        image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return PIL.Image.fromarray(image)


class Tuna2ImageProcessor(BaseImageProcessor):
    r"""
    Converts images to RGB, resizes them to a resolution bucket (or a fixed size) and scales them to [-1, 1] with
    `x = (v / 255 - 0.5) / 0.5`, as the official code does. The options of transformers' image processors that are
    listed below default to these official values; the model was trained on exactly this preprocessing.

    Args:
        patch_size (`int`, defaults to 16):
            Fixed sizes must be multiples of it.
        resolution (`str`, defaults to `"512"`):
            Bucket class, `"512"` or `"1024"`; the bucket nearest to the image's aspect ratio is used.
        size (`dict`, *optional*):
            `{"height": H, "width": W}`: a fixed size instead of buckets.
        resize_mode (`str`, defaults to `"resize"`):
            `"resize"`: a direct bicubic resize to the target (official understanding evaluation; may distort the
            aspect ratio). `"center_crop"`: a bicubic resize that covers the target, then a center crop (official
            editing runner).
        do_convert_rgb (`bool`, defaults to `True`):
            Convert to RGB (transparency composited onto white, 16-bit greyscale rescaled to 8 bits).
        do_resize (`bool`, defaults to `True`):
            Resize to the bucket or `size`; without it, the image's own size must be a multiple of `patch_size`.
        resample (`PILImageResampling`, defaults to `BICUBIC`):
            The resampling filter of the resize.
        do_rescale (`bool`, defaults to `True`):
            Multiply the 8-bit values by `rescale_factor`.
        rescale_factor (`float`, defaults to `1/255`):
            Scale of the rescale.
        do_normalize (`bool`, defaults to `True`):
            Normalize each channel with `(x - image_mean) / image_std`.
        image_mean (`float` or `list[float]`, defaults to `[0.5, 0.5, 0.5]`):
            Mean of the normalization, one value or one per channel.
        image_std (`float` or `list[float]`, defaults to `[0.5, 0.5, 0.5]`):
            Standard deviation of the normalization, one value or one per channel.

    The other options of transformers' image processors (`do_center_crop`, `do_pad`...) raise a `ValueError`.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = Tuna2ImageProcessorKwargs

    def __init__(
        self,
        patch_size: int = 16,
        resolution: str = "512",
        size: dict | None = None,
        resize_mode: str = "resize",
        do_convert_rgb: bool = True,
        do_resize: bool = True,
        resample: PILImageResampling = PILImageResampling.BICUBIC,
        do_rescale: bool = True,
        rescale_factor: float = OFFICIAL_RESCALE_FACTOR,
        do_normalize: bool = True,
        image_mean: float | list[float] = OFFICIAL_MEAN,
        image_std: float | list[float] = OFFICIAL_STD,
        **kwargs,
    ):
        # The other keyword arguments are the mixin's (`image_processor_type`, `auto_map`... from a saved config).
        refuse_options(set(kwargs) & set(ImagesKwargs.__annotations__))
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.resolution = resolution
        self.size = size
        self.resize_mode = resize_mode
        self.do_convert_rgb = do_convert_rgb
        self.do_resize = do_resize
        self.resample = PILImageResampling(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if isinstance(image_mean, (list, tuple)) else image_mean
        self.image_std = list(image_std) if isinstance(image_std, (list, tuple)) else image_std

    def target_size(self, height: int, width: int, resolution: str, size: dict | None) -> tuple[int, int]:
        if size is None:
            return nearest_bucket(height, width, resolution)
        target = (int(size["height"]), int(size["width"]))
        if min(target) <= 0 or target[0] % self.patch_size or target[1] % self.patch_size:
            raise ValueError(
                f"size {target[0]}x{target[1]} must be positive multiples of the patch size {self.patch_size}"
            )
        return target

    @staticmethod
    def resize(
        image: PIL.Image.Image,
        target: tuple[int, int],
        resize_mode: str,
        resample: PILImageResampling = PILImageResampling.BICUBIC,
    ) -> PIL.Image.Image:
        target_h, target_w = target
        if resize_mode == "resize":
            return image.resize((target_w, target_h), resample)
        if resize_mode != "center_crop":
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        scale = max(target_w / image.width, target_h / image.height)
        new_w, new_h = int(round(image.width * scale)), int(round(image.height * scale))
        image = image.resize((new_w, new_h), resample)
        left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
        return image.crop((left, top, left + target_w, top + target_h))

    def preprocess(
        self,
        images,
        resolution: str | None = None,
        size: dict | None = None,
        resize_mode: str | None = None,
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            images: one image or a list (PIL, numpy, tensor, or a URL or file path); nested lists (one per sample)
                are flattened.
            kwargs: any option of the constructor, for this call.

        Returns:
            [`BatchFeature`] with `pixel_values`: a `(num_images, 3, H, W)` tensor when all images share a size,
            else a list of `(3, H, W)` tensors.
        """
        refuse_options(set(kwargs) - set(SUPPORTED_OPTIONS))
        resolution = resolution or self.resolution
        size = size if size is not None else self.size
        resize_mode = resize_mode or self.resize_mode
        options = {
            name: kwargs[name] if kwargs.get(name) is not None else getattr(self, name) for name in SUPPORTED_OPTIONS
        }
        pixel_values = []
        for image in flatten_images(images):
            image = to_pil(image)
            if options["do_convert_rgb"]:
                image = to_rgb(image)
            if image.width == 0 or image.height == 0:
                raise ValueError(f"cannot process a zero-size image ({image.width}x{image.height})")
            if options["do_resize"]:
                target = self.target_size(image.height, image.width, resolution, size)
                image = self.resize(image, target, resize_mode, options["resample"])
            elif image.height % self.patch_size or image.width % self.patch_size:
                raise ValueError(
                    f"with do_resize=False, the image's size {image.height}x{image.width} must be a multiple of the "
                    f"patch size {self.patch_size}"
                )
            pixel_values.append(
                self.scale(
                    np.asarray(image),
                    options["rescale_factor"] if options["do_rescale"] else None,
                    (options["image_mean"], options["image_std"]) if options["do_normalize"] else None,
                )
            )
        return BatchFeature(
            {"pixel_values": stack_if_same_size(pixel_values)}, skip_tensor_conversion=["pixel_values"]
        )

    @staticmethod
    def scale(
        image: np.ndarray,
        rescale_factor: float | None,
        mean_and_std: tuple[float | list[float], float | list[float]] | None,
    ) -> torch.Tensor:
        """`(H, W[, C])` 8-bit values -> a `(C, H, W)` float32 tensor, multiplied by `rescale_factor` (in float64, so
        that the official `1/255` gives exactly `v / 255` in float32), then normalized per channel with
        `mean_and_std`; None skips a step."""
        values = image.astype(np.float64)
        if rescale_factor is not None:
            values = values * rescale_factor
        pixels = torch.from_numpy(values.astype(np.float32)).reshape(*image.shape[:2], -1).permute(2, 0, 1)
        if mean_and_std is not None:
            mean, std = (torch.tensor(value, dtype=torch.float32).reshape(-1, 1, 1) for value in mean_and_std)
            if {len(mean), len(std)} - {1, len(pixels)}:
                raise ValueError(
                    f"image_mean and image_std need one value, or one per channel of the image ({len(pixels)}); "
                    f"got {len(mean)} and {len(std)}"
                )
            pixels = (pixels - mean) / std
        return pixels

    @staticmethod
    def postprocess(images: torch.Tensor, output_type: str = "pil"):
        """`(N, 3, H, W)` (or `(3, H, W)`) values in [-1, 1] -> PIL images or an `(N, H, W, 3)` uint8 array, as the
        official code does: `uint8(clamp((x + 1) / 2, 0, 1) * 255)`, truncated."""
        if images.ndim == 3:
            images = images[None]
        array = (((images.detach().float() + 1) / 2).clamp(0, 1) * 255).permute(0, 2, 3, 1).cpu().numpy()
        array = array.astype(np.uint8)
        if output_type == "np":
            return array
        if output_type == "pil":
            return [PIL.Image.fromarray(image) for image in array]
        raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")


def flatten_images(images) -> list:
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    return [images]


__all__ = ["Tuna2ImageProcessor"]
