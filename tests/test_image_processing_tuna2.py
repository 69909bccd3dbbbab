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


def random_image(height=32, width=48, seed=0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_transformers_options_default_to_the_official_values_and_are_saved(tmp_path):
    processor = Tuna2ImageProcessor(size={"height": 32, "width": 48})
    official = dict(do_convert_rgb=True, do_resize=True, do_rescale=True, do_normalize=True)
    official |= dict(rescale_factor=1 / 255, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert {name: getattr(processor, name) for name in official} == official
    assert processor.resample == PIL.Image.BICUBIC
    image = random_image()
    values = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    assert torch.equal(processor(image)["pixel_values"][0], (values / 255 - 0.5) / 0.5)

    Tuna2ImageProcessor(do_normalize=False, image_std=[0.25, 0.5, 1.0], do_resize=False).save_pretrained(tmp_path)
    reloaded = Tuna2ImageProcessor.from_pretrained(tmp_path)
    assert (reloaded.do_normalize, reloaded.image_std, reloaded.do_resize) == (False, [0.25, 0.5, 1.0], False)


def test_each_transformers_option_changes_the_pixels_as_transformers_processors_do():
    processor = Tuna2ImageProcessor(size={"height": 32, "width": 48})
    image = random_image()
    values = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)

    def pixels(**options):
        return processor(image, **options)["pixel_values"][0]

    assert torch.equal(pixels(do_normalize=False), values / 255)
    assert torch.equal(pixels(do_rescale=False), (values - 0.5) / 0.5)
    assert torch.equal(pixels(do_rescale=False, do_normalize=False), values)
    assert torch.equal(pixels(rescale_factor=-1.0, do_normalize=False), -values)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    expected = (values / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(pixels(image_mean=mean, image_std=std), expected, rtol=0, atol=1e-6)
    assert torch.equal(pixels(image_mean=0.0, image_std=1.0), values / 255)
    nearest = processor(random_image(16, 16), resample=PIL.Image.NEAREST)["pixel_values"][0]
    assert torch.equal(nearest[:, ::2, ::3], processor(random_image(16, 16), do_resize=False)["pixel_values"][0])


def test_do_resize_and_do_convert_rgb_can_be_turned_off():
    processor = Tuna2ImageProcessor()
    assert processor(random_image(32, 48), do_resize=False)["pixel_values"].shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="do_resize=False, the image's size 30x48 must be a multiple of the patch"):
        processor(random_image(30, 48), do_resize=False)
    grey = PIL.Image.new("L", (16, 16), 255)
    assert processor(grey, do_resize=False)["pixel_values"].shape == (1, 3, 16, 16)
    kept_grey = processor(grey, do_resize=False, do_convert_rgb=False, image_mean=0.5, image_std=0.5)
    assert torch.equal(kept_grey["pixel_values"], torch.ones(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"one per channel of the image \(1\); got 3 and 3"):
        processor(grey, do_resize=False, do_convert_rgb=False)
