"""``config.remat``: rematerialised ResNet blocks and BERT layers change memory, never the numbers.

A step with remat must give the loss, the gradients and the new BatchNorm statistics of the step
without it (the statistics are a mutable collection lifted through ``jax.checkpoint``), keep the
parameter names (checkpoints and the torch converters), and lower the step's temporary memory.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_utils import REPO_ROOT, tiny_keepfit_config
from jaxretina.configlib import load_config_module
from jaxretina.models import bert, resnet
from jaxretina.train import classification, contrastive, distributed


# The CPU compiler expands the optimization barriers jax.checkpoint places around a recomputed
# forward *before* its CSE pass, which then merges the recomputation back into the original forward:
# on CPU, remat silently compiles to the program without it (same memory, nothing recomputed). GPU
# and TPU compilers keep the barriers; keeping them here too makes the tests run what they run.
KEEP_REMAT = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=KEEP_REMAT)


def _assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _one_device_mesh():
  return distributed.make_mesh([("data", 1)], jax.devices()[:1])


TEXT = bert.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)


def test_variables_and_their_paths_do_not_depend_on_remat():
  """Same names, shapes and initial values in every mode: checkpoints and from_torch are shared."""
  images = jnp.zeros((1, 32, 32, 3))
  ids = jnp.ones((1, 5), jnp.int32)
  for mode in ("blocks", "dots"):
    for make, x in ((lambda r: resnet.resnet18(base_width=4, num_classes=3, remat=r), images),
                    (lambda r: resnet.resnet50(base_width=4, num_classes=None, remat=r), images),
                    (lambda r: bert.BertModel(dataclasses.replace(TEXT, remat=r)), ids)):
      _assert_trees_close(make(mode).init(jax.random.PRNGKey(0), x), make("none").init(jax.random.PRNGKey(0), x),
                          rtol=0, atol=0)


def test_unknown_mode_is_refused():
  with pytest.raises(ValueError, match="remat"):
    resnet.resnet18(remat="everything").init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="remat"):
    bert.BertConfig(vocab_size=10, remat="layers")


def _tower_gradients(mode: str):
  """Gradients of ResNet-18 (BasicBlocks, train-mode BatchNorm) and of BERT (dropout on), and the
  new batch_stats."""
  r = np.random.default_rng(0)
  images = jnp.asarray(r.normal(size=(4, 32, 32, 3)), jnp.float32)
  ids = jnp.asarray(r.integers(1, 30, (3, 6)), jnp.int32)
  mask = jnp.ones((3, 6), jnp.int32).at[0, 4:].set(0)
  vision = resnet.resnet18(base_width=4, num_classes=5, remat=mode)
  text = bert.BertModel(dataclasses.replace(TEXT, remat=mode))
  v_vars = vision.init(jax.random.PRNGKey(0), images)
  t_vars = text.init(jax.random.PRNGKey(1), ids, mask)

  def loss(params, batch_stats, images, ids, mask):
    logits, mutated = vision.apply({"params": params[0], "batch_stats": batch_stats}, images, train=True,
                                   mutable=["batch_stats"])
    hidden = text.apply({"params": params[1]}, ids, mask, deterministic=False,
                        rngs={"dropout": jax.random.PRNGKey(2)})["last_hidden_state"]
    return jnp.sum(jnp.sin(logits)) + jnp.sum(jnp.sin(hidden)), mutated["batch_stats"]

  step = jax.value_and_grad(loss, has_aux=True)
  args = ((v_vars["params"], t_vars["params"]), v_vars["batch_stats"], images, ids, mask)
  (value, batch_stats), grads = _compile(step, *args)(*args)
  return value, batch_stats, grads, v_vars["batch_stats"]


@pytest.mark.parametrize("mode", ["blocks", "dots"])
def test_tower_gradients_and_batch_stats_do_not_depend_on_remat(mode):
  value, batch_stats, grads, old_stats = _tower_gradients(mode)
  ref_value, ref_stats, ref_grads, _ = _tower_gradients("none")
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  _assert_trees_close(grads, ref_grads)
  _assert_trees_close(batch_stats, ref_stats)
  # The statistics did move: a train-mode BatchNorm under remat, not a frozen one.
  assert int(batch_stats["layer4_1"]["bn2"]["num_batches_tracked"]) == 1
  assert not np.allclose(batch_stats["layer1_0"]["bn1"]["mean"], old_stats["layer1_0"]["bn1"]["mean"])


@functools.lru_cache(maxsize=None)
def _contrastive_step(remat: str):
  """One KeepFIT step of the tiny trainer config: (temp bytes, state, new state, metrics, grads)."""
  config = tiny_keepfit_config("/nonexistent")
  with config.unlocked():
    config.remat = remat
    config.batch_size = 4
  task = contrastive.ContrastiveTask(config, _one_device_mesh(), num_train_examples=8)
  state = jax.jit(task.init_state)(jax.random.PRNGKey(0))
  r = np.random.default_rng(0)
  s, length = config.data.image_size, config.text.max_length

  def tokens(lengths):
    ids = np.zeros((len(lengths), length), np.int32)
    for i, n in enumerate(lengths):
      ids[i, :n] = r.integers(5, 100, n)
    return jnp.asarray(ids), jnp.asarray((ids > 0).astype(np.int32))

  inputs = {"images": jnp.asarray(r.uniform(size=(4, s, s, 3)), jnp.float32),
            "kd_images": jnp.asarray(r.uniform(size=(4, s, s, 3)), jnp.float32),
            "category_id": jnp.asarray([0, 1, 0, 2], jnp.int32)}
  inputs["input_ids"], inputs["attention_mask"] = tokens([3, 5, 4, 7])
  inputs["kd_input_ids"], inputs["kd_attention_mask"] = tokens([6, 2, 3, 4])
  # Dropout stays on (BERT 0.1, revision attention 0.5): the recomputed forward must redraw the same masks.
  key = jax.random.PRNGKey(1)
  compiled = _compile(task.step_on_inputs, state, inputs, key)
  new_state, metrics, grads = compiled(state, inputs, key)
  return int(compiled.memory_analysis().temp_size_in_bytes), state, new_state, metrics, grads


def test_contrastive_step_with_remat_equals_the_step_without():
  _, state, new_state, metrics, grads = _contrastive_step("blocks")
  _, ref_state, ref_new_state, ref_metrics, ref_grads = _contrastive_step("none")
  _assert_trees_close(state.params, ref_state.params, rtol=0, atol=0)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
  _assert_trees_close(grads, ref_grads)
  _assert_trees_close(new_state.batch_stats, ref_new_state.batch_stats)
  _assert_trees_close(new_state.params, ref_new_state.params)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.batch_stats, state.batch_stats)
  assert max(jax.tree.leaves(moved)) > 0


def test_remat_reduces_the_compiled_contrastive_step_temp_memory():
  """Even the tiny config (32 px, 2-layer BERT) saves a third: the block activations dominate."""
  none, blocks = _contrastive_step("none")[0], _contrastive_step("blocks")[0]
  assert blocks < 0.8 * none, (none, blocks)


def _classification_step(remat: str):
  """One DualAttendMed step: Bottleneck blocks at output stride 16, two train-mode passes per step
  (raw, then [crop; drop]) chaining the batch_stats, feature centers in ``system_state``."""
  config = load_config_module(os.path.join(REPO_ROOT, "configs", "dual_attend_med.py")).get_config("steps=1")
  with config.unlocked():
    config.remat = remat
    config.data.image_size = 32
    config.batch_size = 4
    config.model.backbone_base_width, config.model.num_attentions = 8, 4
  labels = np.arange(16) % int(config.data.num_classes)
  task = classification.ClassificationTask(config, _one_device_mesh(), labels)
  state = jax.jit(task.init_state)(jax.random.PRNGKey(0))
  inputs = {"image": jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)}
  args = (state, inputs, jnp.asarray(labels[:4], jnp.int32), jax.random.PRNGKey(1))
  compiled = _compile(task.step_on_inputs, *args)
  return (int(compiled.memory_analysis().temp_size_in_bytes), state) + tuple(compiled(*args))


def test_classification_step_with_remat_equals_the_step_without():
  temp, state, new_state, metrics, grads = _classification_step("blocks")
  ref_temp, ref_state, ref_new_state, ref_metrics, ref_grads = _classification_step("none")
  _assert_trees_close(state.params, ref_state.params, rtol=0, atol=0)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
  _assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
  _assert_trees_close(new_state.batch_stats, ref_new_state.batch_stats)
  _assert_trees_close(new_state.system_state, ref_new_state.system_state)
  assert temp < 0.8 * ref_temp, (ref_temp, temp)
