"""On-device FLAIR augmentation (kornia chain) and the general geometric helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretina.data import augment

NO_AUG = augment.FlairAugmentConfig(flip_p=0.0, affine_p=0.0, jitter_p=0.0)


def _images(batch=8, height=8, width=8, seed=0):
  return jnp.asarray(np.random.default_rng(seed).random((batch, height, width, 3), dtype=np.float32))


def _params(batch, **overrides):
  params = {"flip": jnp.zeros(batch, bool), "affine": jnp.zeros(batch, bool), "angle": jnp.zeros(batch),
            "scale": jnp.ones(batch), "jitter": jnp.zeros(batch, bool), "brightness": jnp.ones(batch),
            "contrast": jnp.ones(batch), "brightness_first": jnp.ones(batch, bool)}
  params.update({k: jnp.asarray(v) for k, v in overrides.items()})
  return params


def test_shapes_dtype_range_and_key_determinism():
  images = _images()
  out = augment.flair_augment(jax.random.key(0), images)
  assert out.shape == images.shape and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  np.testing.assert_array_equal(out, augment.flair_augment(jax.random.key(0), images))
  strong = augment.FlairAugmentConfig(flip_p=1.0, affine_p=1.0, jitter_p=1.0)
  a = augment.flair_augment(jax.random.key(1), images, strong)
  b = augment.flair_augment(jax.random.key(2), images, strong)
  assert not np.allclose(a, b)
  # Independent per-sample draws: identical inputs come out different.
  same = jnp.broadcast_to(images[:1], images.shape)
  out = augment.flair_augment(jax.random.key(3), same, strong)
  assert not np.allclose(out[0], out[1])


def test_identity_when_all_probabilities_zero():
  images = _images()
  np.testing.assert_array_equal(augment.flair_augment(jax.random.key(5), images, NO_AUG), images)


def test_flip_is_exact_when_forced():
  images = _images()
  out = augment.flair_augment(jax.random.key(0), images, augment.FlairAugmentConfig(1.0, 0.0, jitter_p=0.0))
  np.testing.assert_array_equal(out, images[:, :, ::-1, :])


def test_affine_matches_kornia_warp_affine_in_torch():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  image = np.random.default_rng(1).random((7, 9, 3), dtype=np.float32)
  height, width = image.shape[:2]
  angle, scale = 4.3, 0.93
  # kornia: M = T(c) R(angle) S T(-c) (get_rotation_matrix2d(c, -angle, s)); warp_affine normalises it
  # with the align_corners=True pixel map, inverts, and samples with align_corners=False.
  theta = np.deg2rad(angle)
  cx, cy = (width - 1) / 2, (height - 1) / 2
  rotate_scale = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
  rotate_scale[:2, :2] *= scale
  shift = lambda x, y: np.array([[1, 0, x], [0, 1, y], [0, 0, 1.0]])
  m = shift(cx, cy) @ rotate_scale @ shift(-cx, -cy)
  norm = np.array([[2 / (width - 1), 0, -1], [0, 2 / (height - 1), -1], [0, 0, 1.0]])
  src_from_dst = np.linalg.inv(norm @ m @ np.linalg.inv(norm))
  grid = F.affine_grid(torch.tensor(src_from_dst[None, :2]), [1, 3, height, width], align_corners=False)
  nchw = torch.tensor(image, dtype=torch.float64).permute(2, 0, 1)[None]
  expected = F.grid_sample(nchw, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
  expected = expected[0].permute(1, 2, 0).numpy()
  params = _params(1, affine=[True], angle=[angle], scale=[scale])
  out = augment.apply_flair_augment(jnp.asarray(image)[None], params, kornia_grid_quirk=True)[0]
  np.testing.assert_allclose(out, expected, atol=2e-6)
  # Without the quirk the pixel matrix is applied exactly: a 90° turn of a square image is a transpose+flip.
  square = jnp.asarray(image[:7, :7])[None]
  turned = augment.apply_flair_augment(square, _params(1, affine=[True], angle=[90.0]))[0]
  np.testing.assert_allclose(turned, np.rot90(image[:7, :7], k=-1, axes=(0, 1)), atol=1e-5)


def test_color_jitter_formulas_and_order():
  images = _images(batch=2)
  b, c = 1.15, 0.85
  params = _params(2, jitter=[True, True], brightness=[b, b], contrast=[c, c], brightness_first=[True, False])
  out = np.asarray(augment.apply_flair_augment(images, params))
  x = np.asarray(images, np.float64)
  grey_mean = lambda im: (im @ np.array([0.299, 0.587, 0.114])).mean()
  contrast = lambda im: np.clip(c * im + (1 - c) * grey_mean(im), 0, 1)
  brightness = lambda im: np.clip(im * b, 0, 1)
  np.testing.assert_allclose(out[0], contrast(brightness(x[0])), atol=1e-6)
  np.testing.assert_allclose(out[1], brightness(contrast(x[1])), atol=1e-6)


def test_sampled_params_follow_config_ranges():
  params = augment.sample_flair_params(jax.random.key(0), 4096)
  assert abs(float(params["flip"].mean()) - 0.5) < 0.04
  assert abs(float(params["affine"].mean()) - 0.25) < 0.04
  assert abs(float(params["jitter"].mean()) - 0.25) < 0.04
  assert -5.0 <= float(params["angle"].min()) and float(params["angle"].max()) <= 5.0
  assert 0.9 <= float(params["scale"].min()) and float(params["scale"].max()) <= 1.0
  for name in ("brightness", "contrast"):
    assert 0.8 <= float(params[name].min()) and float(params[name].max()) <= 1.2
  with pytest.raises(ValueError, match="flip_p"):
    augment.FlairAugmentConfig(flip_p=1.5)
  with pytest.raises(ValueError, match="NHWC"):
    augment.flair_augment(jax.random.key(0), jnp.zeros((8, 8, 3)))
  with pytest.raises(KeyError, match="contrast"):
    augment.apply_flair_augment(_images(batch=1), {k: v for k, v in _params(1).items() if k != "contrast"})


def test_jit_on_batch_sharded_over_devices():
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
  mesh = jax.sharding.Mesh(np.array(devices[:8]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  images = _images(batch=8)
  sharded = jax.device_put(images, sharding)
  config = augment.FlairAugmentConfig(flip_p=0.5, affine_p=0.5, jitter_p=0.5)
  run = jax.jit(lambda key, x: augment.flair_augment(key, x, config), out_shardings=sharding)
  out = run(jax.random.key(11), sharded)
  assert out.sharding == sharding
  np.testing.assert_allclose(out, augment.flair_augment(jax.random.key(11), images, config), atol=1e-6)


def test_geometric_helpers():
  images = _images(batch=2)
  np.testing.assert_array_equal(augment.random_rotation(jax.random.key(0), images, degrees=0.0), images)
  rotated = augment.random_rotation(jax.random.key(0), images, degrees=30.0)
  assert rotated.shape == images.shape and not np.allclose(rotated, images)
  whole = augment.random_resized_crop(jax.random.key(0), images, (8, 8), scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_allclose(whole, images, atol=1e-6)
  # Same shapes as above (scale/ratio are traced): no second compile.
  crops = augment.random_resized_crop(jax.random.key(1), images, (8, 8))
  assert crops.shape == images.shape and not np.allclose(crops, images)
  assert float(crops.min()) >= 0.0 and float(crops.max()) <= 1.0
