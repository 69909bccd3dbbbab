import numpy as np
import PIL.Image
import pytest
import torch

from transformers_tuna2 import Tuna2ImageProcessor
from transformers_tuna2.image_processing_tuna2 import nearest_bucket


@pytest.mark.parametrize(
    "size, resolution, bucket",
    [
        ((100, 100), "512", (512, 512)),
        ((300, 100), "512", (384, 672)),  # W/H 3 -> 672/384 = 1.75
        ((100, 130), "512", (576, 448)),  # W/H 0.77 -> 448/576 = 0.78
        ((115, 100), "512", (448, 576)),  # W/H 1.15 -> 576/448 = 1.29 beats 1.0
        ((100, 100), "1024", (1024, 1024)),
        ((100, 300), "1024", (1344, 768)),
    ],
)
def test_nearest_bucket(size, resolution, bucket):
    width, height = size
    assert nearest_bucket(height, width, resolution) == bucket


def test_values_are_scaled_to_minus_one_one():
    image = PIL.Image.new("RGB", (16, 16), (0, 255, 128))
    pixels = Tuna2ImageProcessor(size={"height": 16, "width": 16})(image)["pixel_values"]
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor([-1.0, 1.0, (128 / 255 - 0.5) / 0.5]))


def test_resize_modes():
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 100, 3), dtype=np.uint8))
    direct = Tuna2ImageProcessor(size={"height": 32, "width": 32})(image)["pixel_values"]
    expected = (
        torch.from_numpy(np.asarray(image.resize((32, 32), PIL.Image.BICUBIC), dtype=np.float32)) / 255 - 0.5
    ) / 0.5
    torch.testing.assert_close(direct[0], expected.permute(2, 0, 1))
    cropped = Tuna2ImageProcessor(size={"height": 32, "width": 32}, resize_mode="center_crop")(image)["pixel_values"]
    covered = image.resize((64, 32), PIL.Image.BICUBIC).crop((16, 0, 48, 32))
    expected = (torch.from_numpy(np.asarray(covered, dtype=np.float32)) / 255 - 0.5) / 0.5
    torch.testing.assert_close(cropped[0], expected.permute(2, 0, 1))


@pytest.mark.parametrize("mode", ["P", "CMYK", "LA", "L", "RGBA", "I;16", "I", "1"])
def test_any_pil_mode_is_converted_to_rgb(mode):
    rgb = PIL.Image.new("RGB", (20, 20), (200, 40, 90))
    if mode == "I;16":
        image = PIL.Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16))
        assert image.mode == "I;16"
    elif mode == "I":
        image = PIL.Image.fromarray(np.full((20, 20), 32896, dtype=np.int32))
    else:
        image = rgb.convert(mode)
    pixels = Tuna2ImageProcessor(size={"height": 16, "width": 16})(image)["pixel_values"]
    assert pixels.shape == (1, 3, 16, 16)
    assert pixels.min() >= -1 and pixels.max() <= 1
    if mode == "I;16":  # full-scale 16-bit white stays white instead of being clipped from a wrong scale
        assert torch.allclose(pixels, torch.ones_like(pixels))
    if mode == "I":
        assert torch.allclose(pixels, torch.zeros_like(pixels), atol=0.01)  # 32896 / 257 = 128: mid grey


def test_numpy_and_tensor_inputs_match_pil():
    array = np.random.default_rng(1).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    processor = Tuna2ImageProcessor(size={"height": 16, "width": 32})
    from_pil = processor(PIL.Image.fromarray(array))["pixel_values"]
    assert torch.equal(processor(array)["pixel_values"], from_pil)
    assert torch.equal(processor(torch.from_numpy(array).permute(2, 0, 1))["pixel_values"], from_pil)
    assert torch.equal(processor(array.astype(np.float32) / 255)["pixel_values"], from_pil)


def test_postprocess_truncates_like_the_official_code():
    values = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.5]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    array = Tuna2ImageProcessor.postprocess(values, output_type="np")
    assert array.dtype == np.uint8 and array.shape == (1, 1, 5, 3)
    assert array[0, 0, :, 0].tolist() == [0, 63, 127, 254, 255]
    images = Tuna2ImageProcessor.postprocess(values)
    assert isinstance(images[0], PIL.Image.Image) and images[0].size == (5, 1)


def test_bad_images_raise_clear_errors():
    processor = Tuna2ImageProcessor()
    with pytest.raises(ValueError, match="zero-size"):
        processor(PIL.Image.new("RGB", (0, 10)))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        Tuna2ImageProcessor(size={"height": 30, "width": 32})(PIL.Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match="resolution must be one of"):
        processor(PIL.Image.new("RGB", (8, 8)), resolution="768")
    with pytest.raises(ValueError, match="unsupported image type"):
        processor("not an image")
    with pytest.raises(ValueError, match="uint8, or float"):
        processor(np.zeros((8, 8, 3), dtype=np.int64))
