"""WS-DAN / CAL / DualAttendMed: BAP, the model, crop/drop, centers and losses (unit properties)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxretina.losses import wsdan as losses
from jaxretina.models import attention_augment as aug
from jaxretina.models import wsdan


def _normal(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _data_sharding():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


# ------------------------------------------------------------------------------------------ BAP


@pytest.mark.parametrize("pool", wsdan.POOLS)
def test_bap_unit_norm_and_gap_formula(pool):
  features, attentions = _normal((2, 5, 4, 6)), jax.nn.relu(_normal((2, 3, 2, 3), 1))
  fm, cf = jax.jit(functools.partial(wsdan.bilinear_attention_pooling, pool=pool))(features, attentions)
  assert fm.shape == cf.shape == (2, 3 * 6)
  np.testing.assert_allclose(jnp.linalg.norm(fm, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(cf, axis=1), 1.0, rtol=1e-6)
  # eval counterfactual: ones attention = per-channel mean, repeated per map (M-major).
  mean = np.asarray(jnp.mean(features, axis=(1, 2)))
  expected = np.tile(np.sign(mean) * np.sqrt(np.abs(mean) + 1e-6), (1, 3))
  np.testing.assert_allclose(cf, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-5)
  if pool == "GAP":
    resized = np.asarray(jax.jit(wsdan.layers.resize_bilinear_align_corners, static_argnums=1)(attentions, (5, 4)))
    raw = np.einsum("bhwm,bhwc->bmc", resized, np.asarray(features)).reshape(2, -1) / 20
    raw = np.sign(raw) * np.sqrt(np.abs(raw) + 1e-6)
    np.testing.assert_allclose(fm, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_signed_sqrt_eps_inside_root():
  np.testing.assert_allclose(wsdan.signed_sqrt(jnp.zeros(2)), 0.0)  # sign(0) = 0
  np.testing.assert_allclose(wsdan.signed_sqrt(jnp.asarray([-4.0, 4.0])), [-np.sqrt(4 + 1e-6), np.sqrt(4 + 1e-6)])


def test_bap_train_randomness_is_keyed_or_injected():
  features, attentions = _normal((2, 4, 4, 3)), jax.nn.relu(_normal((2, 4, 4, 2), 1))
  with pytest.raises(ValueError, match="key"):
    wsdan.bilinear_attention_pooling(features, attentions, train=True)
  bap = jax.jit(functools.partial(wsdan.bilinear_attention_pooling, train=True))
  a = bap(features, attentions, key=jax.random.key(3))[1]
  b = bap(features, attentions, key=jax.random.key(3))[1]
  c = bap(features, attentions, key=jax.random.key(4))[1]
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  ones = bap(features, attentions, fake_attention=jnp.ones((2, 4, 4, 2)))[1]
  np.testing.assert_allclose(ones, jax.jit(wsdan.bilinear_attention_pooling)(features, attentions)[1], rtol=1e-6)
  with pytest.raises(ValueError, match="fake_attention"):
    wsdan.bilinear_attention_pooling(features, attentions, train=True, fake_attention=jnp.ones((2, 2, 2, 2)))


# ---------------------------------------------------------------------------------------- model


def _head(variant="dualattendmed", **kw):
  return wsdan.WSDAN(num_classes=3, num_attentions=4, variant=variant, backbone_layers=None, **kw)


@pytest.mark.parametrize("variant", wsdan.VARIANTS)
def test_head_outputs_and_determinism_per_key(variant):
  x = _normal((2, 3, 3, 32))
  module = _head(variant)
  variables = jax.jit(module.init)(jax.random.key(0), x)
  out = jax.jit(module.apply)(variables, x)
  assert out.logits.shape == out.effect_logits.shape == (2, 3)
  assert out.feature_matrix.shape == (2, 4 * 32) and out.attention_maps.shape == (2, 3, 3, 4)
  np.testing.assert_allclose(out.attention_map[..., 0], jnp.mean(out.attention_maps, -1), rtol=1e-6)
  assert (out.channel_weights is None) == (variant == "cal")

  run = jax.jit(lambda v, a, k: module.apply(v, a, train=True, key=k, mutable=["batch_stats"])[0])
  first, again, other = run(variables, x, jax.random.key(1)), run(variables, x, jax.random.key(1)), run(
      variables, x, jax.random.key(2))
  assert first.attention_map.shape == (2, 3, 3, 2)
  np.testing.assert_array_equal(first.effect_logits, again.effect_logits)
  assert not np.allclose(first.effect_logits, other.effect_logits)
  with pytest.raises(ValueError, match="key"):
    module.apply(variables, x, train=True, mutable=["batch_stats"])


def test_injected_picks_select_maps():
  x = _normal((2, 3, 3, 32))
  module = _head()
  variables = jax.jit(module.init)(jax.random.key(0), x)
  picks = jnp.asarray([[3, 0], [1, 1]])
  out = jax.jit(functools.partial(module.apply, train=True))(variables, x, fake_attention=jnp.ones((2, 3, 3, 4)),
                                                             pick_indices=picks)
  maps = np.asarray(out.attention_maps)
  np.testing.assert_array_equal(out.attention_map[0], maps[0][..., [3, 0]])
  np.testing.assert_array_equal(out.attention_map[1], maps[1][..., [1, 1]])


def test_pick_sampling_distinct_by_default_and_follows_weights():
  probs = jnp.tile(jnp.asarray([[0.7, 0.1, 0.1, 0.1]]), (400, 1))
  picks = wsdan.sample_pick_indices(jax.random.key(0), probs)
  assert bool(jnp.all(picks[:, 0] != picks[:, 1]))
  assert float(jnp.mean(picks[:, 0] == 0)) > 0.5
  with_repl = wsdan.sample_pick_indices(jax.random.key(0), probs, with_replacement=True)
  assert bool(jnp.any(with_repl[:, 0] == with_repl[:, 1]))


def test_negative_attention_mass_clamped_or_surfaced():
  maps = -jnp.ones((1, 2, 2, 3))
  probs = wsdan.attention_pick_weights(maps, clamp_negative=True)
  np.testing.assert_allclose(probs, 1 / 3, rtol=1e-6)
  assert not bool(jnp.all(jnp.isfinite(wsdan.attention_pick_weights(maps, clamp_negative=False))))

  x = _normal((1, 3, 3, 32))
  module = _head(clamp_negative_attention_mass=False)
  variables = jax.jit(module.init)(jax.random.key(0), x)
  params = jax.tree_util.tree_map(lambda a: a, variables["params"])
  params["attentions"]["bias"] = -100.0 * jnp.ones(4)
  out = jax.jit(functools.partial(module.apply, train=True))({"params": params}, x, key=jax.random.key(0))
  assert bool(jnp.all(jnp.isnan(out.attention_map)))
  assert bool(jnp.all(jnp.isfinite(out.logits)))
  assert out.channel_weights.shape == (1, 32)  # batch axis kept for B == 1


def test_torch_key_rename():
  assert wsdan.torch_key_rename("features.0.weight") == "features.conv1.weight"
  assert wsdan.torch_key_rename("features.1.running_var") == "features.bn1.running_var"
  assert wsdan.torch_key_rename("module.features.7.2.conv3.weight") == "features.layer4.2.conv3.weight"
  assert wsdan.torch_key_rename("feature_center") is None
  assert wsdan.torch_key_rename("fc.weight") == "fc.weight"
  with pytest.raises(wsdan.convert.ConversionError, match="features.2"):
    wsdan.torch_key_rename("features.2.weight")


def test_from_torch_head_accepts_feature_center():
  module = _head("cal")
  rng = np.random.default_rng(0)
  sd = {"attentions.conv.weight": rng.normal(size=(4, 32, 1, 1)), "attentions.bn.weight": np.ones(4),
        "attentions.bn.bias": np.zeros(4), "attentions.bn.running_mean": np.zeros(4),
        "attentions.bn.running_var": np.ones(4), "attentions.bn.num_batches_tracked": np.asarray(0),
        "fc.weight": rng.normal(size=(3, 128)), "feature_center": np.zeros((3, 128))}
  variables = wsdan.from_torch(sd, module, input_shape=(1, 3, 3, 32))
  assert variables["params"]["fc"]["kernel"].shape == (128, 3)
  assert wsdan.feature_centers_from_checkpoint(sd).shape == (3, 128)


# ------------------------------------------------------------------------------------ crop/drop


def _peaked_maps(batch=8):
  maps = np.full((batch, 4, 5, 1), 0.05, np.float32)
  for b in range(batch):
    maps[b, b % 4, (b * 2) % 5, 0] = 1.0 + b
  return jnp.asarray(maps)


def test_crop_boxes_inside_image_and_cover_peak():
  maps = _peaked_maps()
  boxes = np.asarray(aug.crop_boxes(maps, (30, 26), 0.5, 0.1))
  assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 1] <= 30) and np.all(boxes[:, 0] < boxes[:, 1])
  assert np.all(boxes[:, 2] >= 0) and np.all(boxes[:, 3] <= 26) and np.all(boxes[:, 2] < boxes[:, 3])
  for b in range(8):
    peak_row = round((b % 4) * 29 / 3)
    peak_col = round(((b * 2) % 5) * 25 / 4)
    assert boxes[b, 0] <= peak_row < boxes[b, 1] and boxes[b, 2] <= peak_col < boxes[b, 3]


_augment = jax.jit(aug.batch_augment, static_argnames=("mode", "theta", "padding_ratio", "drop_last_mask_row"))


def test_crop_of_full_box_is_identity_and_of_constant_is_constant():
  images = _normal((8, 30, 26, 3))
  flat = jnp.ones((8, 4, 5, 1))  # every pixel passes the threshold, padding clips to the image
  # Exactly, as torch copies: jitted, a scale (L−1)/(out−1) computed as x·(1/(out−1)) is 1 − ulp and
  # blends neighbouring pixels (errors ~1e-5 that flip downstream ReLU decisions).
  np.testing.assert_array_equal(_augment(images, flat, "crop", 0.5, 0.1), images)
  # Upstream's box end int(r_max + pad·H) is exclusive: int(29 + 3.0000000000000004) = 32 → 30,
  # but with no padding int(29 + 0) = 29 cuts off the last row.
  upstream_box = aug.crop_boxes(flat[:1], (30, 26), 0.5, 0.0, drop_last_mask_row=True)
  np.testing.assert_array_equal(upstream_box, [[0, 29, 0, 25]])
  np.testing.assert_array_equal(aug.crop_boxes(flat[:1], (30, 26), 0.5, 0.0), [[0, 30, 0, 26]])
  constant = jnp.full((8, 30, 26, 3), 2.5)
  np.testing.assert_allclose(_augment(constant, _peaked_maps(), "crop", 0.5, 0.1), 2.5, rtol=1e-6)


def test_drop_zeroes_exactly_above_threshold():
  images = _normal((8, 30, 26, 3)) + 10.0
  maps = _peaked_maps()
  out = _augment(images, maps, "drop", 0.5)
  resized = aug.layers.resize_bilinear_align_corners(maps, (30, 26))
  high = resized >= 0.5 * jnp.max(maps, axis=(1, 2, 3), keepdims=True)
  assert bool(jnp.all(jnp.where(high, out == 0, out == images)))
  assert bool(jnp.any(high))


def test_theta_range_keyed_or_injected():
  images, maps = _normal((8, 30, 26, 3)), _peaked_maps()
  with pytest.raises(ValueError, match="key"):
    aug.attention_crop(images, maps, (0.4, 0.6))
  thetas = aug.sample_thetas(jax.random.key(0), (0.4, 0.6), 8)
  assert bool(jnp.all((thetas >= 0.4) & (thetas <= 0.6)))
  a = _augment(images, maps, "crop", (0.4, 0.6), 0.1, key=jax.random.key(5))
  np.testing.assert_array_equal(a, _augment(images, maps, "crop", (0.4, 0.6), 0.1, key=jax.random.key(5)))
  injected = _augment(images, maps, "drop", (0.2, 0.5), thetas=jnp.full((8,), 0.3))
  np.testing.assert_array_equal(injected, _augment(images, maps, "drop", 0.3))
  with pytest.raises(ValueError, match="mode"):
    aug.batch_augment(images, maps, "flip")
  with pytest.raises(ValueError, match="batch"):
    aug.attention_drop(images, maps[:2], 0.5)


def test_crop_drop_sharded_equal_single_device():
  images, maps = _normal((8, 30, 26, 3)), _peaked_maps()
  key = jax.random.key(7)
  fn = jax.jit(lambda im, m, k: (aug.batch_augment(im, m, "crop", (0.4, 0.6), 0.1, key=k),
                                 aug.batch_augment(im, m, "drop", 0.5)))
  single = fn(images, maps, key)
  shard, _ = _data_sharding()
  sharded = fn(jax.device_put(images, shard), jax.device_put(maps, shard), key)
  assert len(sharded[0].sharding.device_set) == len(jax.devices())
  for a, b in zip(single, sharded):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------------------------- centers


def test_center_update_moves_towards_batch_mean():
  feats = _normal((6, 8))
  labels = jnp.asarray([0, 0, 2, 2, 2, 0])
  centers = wsdan.init_feature_centers(4, 8)
  new = wsdan.update_feature_centers(centers, feats, labels, beta=0.05)
  np.testing.assert_allclose(new[0], 0.05 * jnp.mean(feats[jnp.asarray([0, 1, 5])], axis=0), rtol=1e-5)
  np.testing.assert_allclose(new[2], 0.05 * jnp.mean(feats[2:5], axis=0), rtol=1e-5)
  np.testing.assert_array_equal(new[1], 0.0)
  np.testing.assert_array_equal(new[3], 0.0)
  # Repeated updates converge on the class mean direction.
  c = jax.jit(lambda c0: jax.lax.fori_loop(
      0, 300, lambda _, c: wsdan.update_feature_centers(c, feats, labels, beta=0.05), c0))(centers)
  target = jnp.mean(feats[2:5], axis=0)
  cos = jnp.dot(c[2], target) / (jnp.linalg.norm(c[2]) * jnp.linalg.norm(target))
  assert float(cos) > 0.999

  last = wsdan.update_feature_centers(centers, feats, labels, beta=0.05, duplicate_labels="last")
  np.testing.assert_allclose(last[0], 0.05 * feats[5], rtol=1e-6)


def test_center_update_dualattendmed_rules():
  feats = _normal((4, 8))
  labels = jnp.asarray([1, 1, 3, 1])
  centers = wsdan.init_feature_centers(4, 8, "dualattendmed", key=jax.random.key(1))
  normalized = centers / jnp.linalg.norm(centers, axis=1, keepdims=True)
  new = wsdan.update_feature_centers(centers, feats, labels, rule="dualattendmed")
  np.testing.assert_allclose(new[3], normalized[3] + 0.05 * (feats[2] - normalized[3]), rtol=1e-5)
  shared = wsdan.update_feature_centers(centers, feats, labels, rule="dualattendmed", share_batch_mean=True)
  batch_mean = jnp.mean(feats - normalized[labels], axis=0)
  np.testing.assert_allclose(shared[1], normalized[1] + 0.05 * batch_mean, rtol=1e-5)
  np.testing.assert_allclose(shared[3], normalized[3] + 0.05 * batch_mean, rtol=1e-5)
  np.testing.assert_array_equal(new[0], centers[0])
  with pytest.raises(ValueError, match="key"):
    wsdan.init_feature_centers(4, 8, "dualattendmed")


def test_center_update_sharded_equal_single_device():
  feats = _normal((16, 12))
  labels = jnp.asarray([0, 1, 2, 3, 4] * 3 + [0])
  centers = _normal((5, 12), 3)
  fn = jax.jit(lambda c, f, y: wsdan.update_feature_centers(c, f, y, beta=0.05))
  single = fn(centers, feats, labels)
  shard, replicated = _data_sharding()
  sharded = fn(jax.device_put(centers, replicated), jax.device_put(feats, shard), jax.device_put(labels, shard))
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------- losses


def test_losses_vanish_in_trivial_cases():
  f = _normal((3, 16))
  assert float(losses.center_loss(f, f)) == 0.0
  same_maps = jnp.tile(_normal((2, 3, 3, 1)), (1, 1, 1, 4))
  assert float(losses.attention_alignment_loss(same_maps)) < 1e-12
  assert float(losses.diversity_loss(10.0 * jnp.ones((2, 3, 3, 4)))) == 0.0
  np.testing.assert_allclose(losses.diversity_loss(jnp.zeros((2, 3, 3, 4)), margin=0.1), 0.1, rtol=1e-6)
  np.testing.assert_allclose(losses.center_loss(f, jnp.zeros_like(f)), jnp.sum(f**2) / 3, rtol=1e-6)


def test_diversity_loss_matches_pair_loop():
  maps = np.asarray(_normal((2, 3, 3, 5))) * 0.3
  expected = []
  for b in range(2):
    vals = [max(0.1 - np.sum((maps[b, ..., i] * maps[b, ..., j]) ** 2), 0) for i in range(5) for j in range(i + 1, 5)]
    expected.append(np.mean(vals))
  np.testing.assert_allclose(jax.jit(losses.diversity_loss)(maps), np.mean(expected), rtol=1e-5)
  np.testing.assert_allclose(jax.jit(losses.diversity_loss)(maps[0]), expected[0], rtol=1e-5)


def test_auxiliary_loss_v2_matches_loop_and_blocks_center_gradient():
  f, c = np.asarray(_normal((3, 12))), np.asarray(_normal((3, 12), 1))
  fn = f / np.linalg.norm(f, axis=1, keepdims=True)
  cn = c / np.linalg.norm(c, axis=1, keepdims=True)
  intra = min(np.mean(np.maximum(np.linalg.norm(fn - cn, axis=1) - 0.1, 0)), 10)
  parts = cn.reshape(3, 4, 3)
  inter = sum(max(1.0 - np.mean(np.linalg.norm(parts[:, j] - parts[:, k], axis=1)), 0)
              for j in range(4) for k in range(j + 1, 4)) / 4 / 0.05
  got = jax.jit(lambda a, b: losses.auxiliary_loss_v2(a, b, 4))(f, c)
  np.testing.assert_allclose(got, intra + min(inter, 100), rtol=1e-5)
  grad_c = jax.grad(lambda cc: losses.auxiliary_loss_v2(jnp.asarray(f), cc, 4))(jnp.asarray(c))
  np.testing.assert_array_equal(grad_c, 0.0)


def test_classification_mixes_and_total():
  k = jax.random.split(jax.random.key(0), 4)
  raw, aux = jax.random.normal(k[0], (2, 3)), jax.random.normal(k[1], (2, 3))
  aug_l, aug_aux = jax.random.normal(k[2], (4, 3)), jax.random.normal(k[3], (4, 3))
  y = jnp.asarray([0, 2])
  y2, y3 = jnp.concatenate([y, y]), jnp.concatenate([y, y, y])
  ce = lambda lg, lb: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(lg, lb))
  aux_all = jnp.concatenate([aux, aug_aux])
  np.testing.assert_allclose(losses.cal_classification_loss(raw, aux, aug_l, aug_aux, y),
                             ce(raw, y) / 3 + ce(aux_all, y3) + ce(aug_l, y2) * 2 / 3, rtol=1e-6)
  dam = losses.dualattendmed_classification_loss(raw, aux, aug_l, aug_aux, y)
  np.testing.assert_allclose(dam, (ce(raw, y) + 2 * ce(aug_l, y2) + 3 * ce(aux_all, y3)) / 6, rtol=1e-6)
  total = losses.dualattendmed_loss(dam, 2.0, 3.0, 50.0, epoch=1)
  np.testing.assert_allclose(total, dam + 0.5 * 2.0 + 0.1 * 3.0 + 0.01 * 10.0, rtol=1e-6)
  np.testing.assert_allclose(losses.dualattendmed_loss(dam, 2.0, 3.0, 50.0, epoch=7) - total, -0.05, atol=1e-6)
