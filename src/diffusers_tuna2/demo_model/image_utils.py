"""The layout of `pixel_values`, shared by the image processor, the model and the training collator: one
`(num_images, channels, height, width)` tensor when all images share a size, else a list of `(channels, height,
width)` tensors."""

import torch


def make_image_list(pixel_values: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """Returns the images of `pixel_values` as a list of `(C, H, W)` tensors."""
    if isinstance(pixel_values, torch.Tensor):
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must have shape (num_images, channels, height, width), got {tuple(pixel_values.shape)}"
            )
        return list(pixel_values.unbind(0))
    images = list(pixel_values)
    for image in images:
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            raise ValueError("pixel_values given as a list must hold (channels, height, width) tensors")
    return images


def stack_if_same_size(images: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One `(n, C, H, W)` tensor when all images share a size, else the list."""
    return torch.stack(images) if len({tuple(image.shape) for image in images}) == 1 else images
