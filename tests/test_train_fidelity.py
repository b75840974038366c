"""The contrastive recipe as upstream runs it: text pooling per tokenised batch, per-rank revision
attention, the in-place logit-scale clamp, dataset-balanced sampling and the banned-category filter.

Each test fails on the deviation it names (they were found in a review of the training path).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_utils import tiny_keepfit_config
from jaxretina.data import pipeline
from jaxretina.models import flair
from jaxretina.train import contrastive, distributed
from jaxretina.train.state import TrainState


def _task(scope: str = "global", devices: int = 1, knowledge: bool = True) -> contrastive.ContrastiveTask:
  config = tiny_keepfit_config("/nonexistent", knowledge=knowledge)
  with config.unlocked():
    config.loss.contrastive_scope = scope
    config.model.attention_dropout = 0.0
    config.text.bert.hidden_dropout_prob = 0.0
    config.text.bert.attention_probs_dropout_prob = 0.0
    config.batch_size = 4
  mesh = distributed.make_mesh([("data", devices)], jax.devices()[:devices])
  return contrastive.ContrastiveTask(config, mesh, num_train_examples=8)


def _state(task) -> TrainState:
  return jax.jit(task.init_state)(jax.random.PRNGKey(0))


def _inputs(task, rng: int = 0, length: int | None = None) -> dict:
  """A batch of 4 with texts of lengths 3, 5, 4, 7 (padded to ``length``) and 4 knowledge pairs."""
  r = np.random.default_rng(rng)
  length = length or task.config.text.max_length

  def tokens(lengths):
    ids = np.zeros((len(lengths), length), np.int32)
    for i, n in enumerate(lengths):
      ids[i, :n] = r.integers(5, 100, n)
    return jnp.asarray(ids), jnp.asarray((ids > 0).astype(np.int32))

  s = task.config.data.image_size
  inputs = {"images": jnp.asarray(r.uniform(size=(4, s, s, 3)), jnp.float32),
            "category_id": jnp.asarray([0, 1, 0, 2], jnp.int32),
            "kd_images": jnp.asarray(r.uniform(size=(4, s, s, 3)), jnp.float32)}
  inputs["input_ids"], inputs["attention_mask"] = tokens([3, 5, 4, 7])
  inputs["kd_input_ids"], inputs["kd_attention_mask"] = tokens([6, 2, 3, 4])
  return inputs


def _repad(ids, mask, length):
  return ids[:, :length], mask[:, :length]


def test_text_embedding_does_not_depend_on_static_padding():
  """Deviation 1: a batch padded to max_length embeds as the same batch padded to its longest text."""
  task = _task()
  state = _state(task)
  inputs = _inputs(task)
  encode = jax.jit(lambda v, i, m: task.model.apply(v, i, m, method=flair.TwoTower.encode_text))
  padded = encode(state.variables(), inputs["input_ids"], inputs["attention_mask"])
  longest = encode(state.variables(), *_repad(inputs["input_ids"], inputs["attention_mask"], 7))
  np.testing.assert_allclose(padded, longest, rtol=1e-5, atol=1e-6)
  # The pooling still covers [PAD] positions up to the longest text (FLAIR), not just real tokens.
  shorter = encode(state.variables(), *_repad(inputs["input_ids"][:1], inputs["attention_mask"][:1], 3))
  assert not np.allclose(padded[0], shorter[0], atol=1e-4)


def test_training_loss_does_not_depend_on_static_padding():
  task = _task()
  state = _state(task)
  loss = jax.jit(task.loss_fn)
  inputs = _inputs(task)
  short = dict(inputs)
  short["input_ids"], short["attention_mask"] = _repad(inputs["input_ids"], inputs["attention_mask"], 7)
  short["kd_input_ids"], short["kd_attention_mask"] = _repad(inputs["kd_input_ids"], inputs["kd_attention_mask"], 6)
  key = jax.random.PRNGKey(1)
  (a, (ma, _)), (b, (mb, _)) = loss(state.params, state.batch_stats, inputs, key), loss(
      state.params, state.batch_stats, short, key)
  for name in ("loss_main", "loss_kd", "loss_revision"):
    np.testing.assert_allclose(ma[name], mb[name], rtol=1e-5, atol=1e-7)


def test_revision_attention_is_per_rank_with_per_device_scope():
  """Deviation 2: with per-device losses each rank's queries attend to its own knowledge pairs."""
  task = _task("per_device", devices=2)
  assert task.groups == 2
  state = _state(task)
  inputs = _inputs(task)
  _, (metrics, _) = jax.jit(task.loss_fn)(state.params, state.batch_stats, inputs, jax.random.PRNGKey(0))

  def embeddings(m):
    pools = task._pool_lengths(inputs["attention_mask"]), task._pool_lengths(inputs["kd_attention_mask"])
    return (m.encode_image(inputs["images"], train=True),
            m.encode_text(inputs["input_ids"], inputs["attention_mask"], train=True, pool_lengths=pools[0]),
            m.encode_image(inputs["kd_images"], train=True),
            m.encode_text(inputs["kd_input_ids"], inputs["kd_attention_mask"], train=True, pool_lengths=pools[1]))

  img, txt, kd_img, kd_txt = task.model.apply(state.variables(), method=embeddings, mutable=["batch_stats"])[0]
  revise = lambda *a: task.model.apply(state.variables(), *a, method=flair.TwoTower.revise)  # noqa: E731
  per_rank = [np.mean(np.square(txt[g] - revise(img[g], kd_img[g], kd_txt[g]))) for g in (slice(0, 2), slice(2, 4))]
  np.testing.assert_allclose(metrics["loss_revision"], np.mean(per_rank), rtol=1e-5)
  whole_batch = np.mean(np.square(txt - revise(img, kd_img, kd_txt)))
  assert abs(float(metrics["loss_revision"]) - whole_batch) > 1e-4 * whole_batch


def test_per_rank_text_pooling_uses_each_ranks_longest_text():
  task = _task("per_device", devices=2)
  inputs = _inputs(task)
  np.testing.assert_array_equal(task._pool_lengths(inputs["attention_mask"]), [5, 5, 7, 7])
  assert _task()._pool_lengths(inputs["attention_mask"]) is None  # global: the batch's longest (7)


@pytest.mark.parametrize("start", [flair.LOGIT_SCALE_MAX, 4.75])
def test_logit_scale_clamp_passes_the_full_gradient(start):
  """Deviation 6: upstream clamps ``logit_scale.data`` in place, so the gradient at the clamp is the
  full derivative of the loss at the clamped value (jnp.clip would halve it at the boundary and zero
  it above), and nothing clamps the updated value."""
  task = _task(knowledge=False)
  state = _state(task)
  state = state.replace(params=dict(state.params, logit_scale=jnp.asarray(start, jnp.float32)))
  inputs = _inputs(task)
  key = jax.random.PRNGKey(0)
  new_state, _, grads = jax.jit(task.step_on_inputs)(state, inputs, key)

  def loss_at(scale):
    params = dict(state.params, logit_scale=jnp.asarray(scale, jnp.float32))
    return float(task.loss_fn(params, state.batch_stats, inputs, key)[0])

  h = 1e-2
  from_below = (loss_at(flair.LOGIT_SCALE_MAX) - loss_at(flair.LOGIT_SCALE_MAX - h)) / h
  np.testing.assert_allclose(grads["logit_scale"], from_below, rtol=0.05)
  lr = float(task.schedule(0))
  moved = float(new_state.params["logit_scale"]) - flair.LOGIT_SCALE_MAX
  assert abs(abs(moved) - lr) < 0.05 * lr, (moved, lr)  # Adam's first step ≈ lr·sign(g), from the clamped value


def test_warmup_starts_at_lr_over_warmup_iterations():
  from jaxretina.train import optim

  schedule = optim.flair_warmup_cosine(1e-4, steps_per_epoch=2, warmup_epochs=2.0)
  np.testing.assert_allclose(schedule(0), 1e-4 / 4, rtol=1e-6)
  np.testing.assert_allclose(schedule(3), 1e-4, rtol=1e-6)


def _records(spec):
  return [{"dataset": key, "categories": repr(cats)} for key, n, cats in spec for _ in range(n)]


def test_dataset_balanced_sampling_over_the_mix():
  """Deviation 3: FLAIR's ``balance=True`` draws dataset i mod K, then a record inside it."""
  records = _records([("01_BIG", 90, ["normal"]), ("02_SMALL", 10, ["glaucoma"])])
  mix = pipeline.pretraining_source(records, balance=True, seed=3)
  assert len(mix) == 100  # FLAIR's epoch length: the number of records
  drawn = collections.Counter(mix[i]["dataset"] for i in range(len(mix)))
  assert drawn == {"01_BIG": 50, "02_SMALL": 50}
  again = pipeline.pretraining_source(records, balance=True, seed=3)
  assert [again[i] for i in range(20)] == [mix[i] for i in range(20)]  # a function of (seed, i): resumable
  assert pipeline.pretraining_source(records) is records


@pytest.mark.parametrize("match, kept", [("substring", 2), ("exact", 3)])
def test_banned_categories_are_dropped_as_upstream_matches_them(match, kept):
  """Deviation 9: FLAIR bans a record when a banned string is inside a category ('myop' in
  'pathologic myopia'); KeepFIT only on an exactly equal category."""
  records = _records([("a", 1, ["normal"]), ("a", 1, ["pathologic myopia"]), ("b", 1, ["cataract", "normal"]),
                      ("b", 1, ["glaucoma"])])
  source = pipeline.pretraining_source(records, banned_categories=["myop", "cataract"], banned_match=match)
  assert len(source) == kept
  assert all("cataract" not in source[i]["categories"] for i in range(len(source)))


def test_paper_configs_sample_and_filter_as_upstream():
  from train_utils import REPO_ROOT
  from jaxretina.configlib import load_config_module
  import os

  flair_paper = load_config_module(os.path.join(REPO_ROOT, "configs", "flair.py")).get_config("paper")
  keepfit_paper = load_config_module(os.path.join(REPO_ROOT, "configs", "keepfit.py")).get_config("paper")
  assert flair_paper.data.balance and flair_paper.data.banned_match == "substring"
  assert not keepfit_paper.data.balance and keepfit_paper.data.banned_match == "exact"
  assert "myop" in flair_paper.data.banned_categories and "myop" in keepfit_paper.data.banned_categories
