"""FLAIR image preprocessing (jaxretina.data.imaging): canvas resize, /255, FOV crop."""

import numpy as np
import pytest

from jaxretina.data import imaging


def _random_image(h, w, c=3, seed=0):
  return (np.random.default_rng(seed).random((h, w, c)) * 255).astype(np.float32)


@pytest.mark.parametrize("shape,resized", [((50, 70), (45, 64)), ((70, 50), (64, 45)), ((32, 32), (64, 64))])
def test_flair_preprocess_shape_and_zero_padding(shape, resized):
  image = _random_image(*shape) + 1.0  # strictly positive, so padding is the only zero
  out = imaging.flair_preprocess(image, image_size=64)
  assert out.shape == (64, 64, 3) and out.dtype == np.float32
  rh, rw = resized
  assert np.all(out[:rh, :rw] > 0)
  assert np.all(out[rh:] == 0) and np.all(out[:, rw:] == 0)
  assert out.max() <= 256.0 / 255.0


def test_flair_preprocess_divides_by_255_and_keeps_constant_images():
  out = imaging.flair_preprocess(np.full((40, 20, 3), 102, np.uint8), image_size=32)
  np.testing.assert_allclose(out[:, :16], 0.4, atol=1e-6)
  assert np.all(out[:, 16:] == 0)


def test_flair_preprocess_all_zero_image_is_not_divided():
  out = imaging.flair_preprocess(np.zeros((10, 10, 3), np.float32), image_size=8)
  assert out.shape == (8, 8, 3) and np.all(out == 0)


def test_flair_preprocess_does_not_mutate_the_callers_array():
  image = _random_image(50, 70)
  before = image.copy()
  imaging.flair_preprocess(image, image_size=64)
  np.testing.assert_array_equal(image, before)


def test_grayscale_images_keep_one_channel():
  out = imaging.flair_preprocess(_random_image(30, 20, 1)[..., 0], image_size=16)
  assert out.shape == (16, 16, 1)


@pytest.mark.parametrize("in_hw,out_hw", [((50, 70), (45, 64)), ((13, 100), (29, 7)), ((5, 6), (9, 11))])
def test_antialiased_resize_matches_torch(in_hw, out_hw):
  torch = pytest.importorskip("torch")
  image = np.random.default_rng(1).random(in_hw + (3,)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.tensor(image).permute(2, 0, 1)[None], size=out_hw, mode="bilinear",
                                        align_corners=False, antialias=True)[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(imaging.antialiased_resize(image, out_hw), ref, atol=1e-6)


def test_resize_weights_rows_are_normalised_triangles():
  w = imaging.resize_weights(70, 64)
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
  assert np.all(w >= 0)
  # Downscaling widens the filter to the scale: some outputs mix three inputs.
  assert (np.count_nonzero(w, axis=1) >= 3).any()
  # Upscaling is plain bilinear: at most two taps.
  assert np.count_nonzero(imaging.resize_weights(5, 9), axis=1).max() <= 2


def test_canvas_resize_uint8_roundtrip():
  image = (np.random.default_rng(2).random((97, 131, 3)) * 255).astype(np.uint8)
  out = imaging.canvas_resize(image, image_size=64)
  assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
  assert np.all(out[47:] == 0) and np.any(out[46] > 0)  # 97·64/131 = 47.4 → 47 rows kept
  ref = imaging.flair_preprocess(image, image_size=64) * 255.0
  assert np.max(np.abs(out.astype(np.float32) - ref)) <= 1.0
  const = imaging.canvas_resize(np.full((30, 40, 3), 200, np.uint8), image_size=64)
  np.testing.assert_array_equal(np.unique(const[:48]), [200])


def test_canvas_resize_float_is_not_rescaled():
  out = imaging.canvas_resize(np.full((8, 4, 3), 3.0, np.float32), image_size=8)
  np.testing.assert_allclose(out[:, :4], 3.0, rtol=1e-6)


def _disc_image():
  h, w = 100, 140
  yy, xx = np.mgrid[:h, :w]
  image = np.zeros((h, w, 3), np.uint8)
  disc = (yy - 50) ** 2 + (xx - 80) ** 2 <= 30**2
  image[disc] = (180, 90, 40)
  image[5:8, 5:8] = (250, 250, 250)  # a small bright speck: not the field of view
  return image


def test_crop_fov_crops_to_the_largest_component():
  image = _disc_image()
  crop = imaging.crop_fov(image)
  assert crop.shape == (61, 61, 3)
  np.testing.assert_array_equal(crop, image[20:81, 50:111])


def test_crop_fov_without_foreground_returns_a_copy():
  image = np.zeros((10, 12, 3), np.uint8)
  out = imaging.crop_fov(image)
  assert out.shape == image.shape and out is not image


def test_li_threshold_matches_scikit_image():
  filters = pytest.importorskip("skimage.filters")
  rng = np.random.default_rng(3)
  values = np.concatenate([rng.normal(20, 5, 500), rng.normal(150, 20, 300)]).clip(0, 255).round()
  assert imaging.li_threshold(values) == pytest.approx(filters.threshold_li(values), rel=1e-6)


def test_bad_input_is_reported():
  with pytest.raises(ValueError, match="flair_preprocess"):
    imaging.flair_preprocess(np.zeros((2, 3, 4, 5)))
  with pytest.raises(ValueError, match="image_size"):
    imaging.flair_preprocess(np.zeros((4, 4, 3)), image_size=0)
