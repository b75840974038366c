"""``config.microbatches``: a global batch run in sequential pieces keeps every negative (GradCache)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_utils import tiny_keepfit_config
from jaxretina.train import contrastive, distributed, microbatch


def test_split_and_merge_keep_rows_on_their_shard():
  x = jnp.arange(16)
  chunks = microbatch.split(x, 2, 4)  # 4 shards of 4 rows, 2 microbatches of 2 rows per shard
  np.testing.assert_array_equal(chunks, [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]])
  np.testing.assert_array_equal(microbatch.merge(chunks, 4), x)
  with pytest.raises(ValueError, match="config.microbatches"):
    microbatch.check(3, 16, 4)


def _task(microbatches: int, knowledge: bool = True, scope: str = "global"):
  config = tiny_keepfit_config("/nonexistent", knowledge=knowledge)
  with config.unlocked():
    config.batch_size = 8
    config.microbatches = microbatches
    config.loss.contrastive_scope = scope
    config.model.attention_dropout = 0.0
    config.text.bert.hidden_dropout_prob = 0.0
    config.text.bert.attention_probs_dropout_prob = 0.0
  mesh = distributed.make_mesh("data:2", jax.devices()[:2])
  return contrastive.ContrastiveTask(config, mesh, num_train_examples=16)


def _inputs(task, seed=0):
  r = np.random.default_rng(seed)
  s, length = task.config.data.image_size, task.config.text.max_length

  def tokens(n):
    ids = np.zeros((n, length), np.int32)
    for i, m in enumerate(r.integers(2, length, n)):
      ids[i, :m] = r.integers(5, 100, m)
    return jnp.asarray(ids), jnp.asarray((ids > 0).astype(np.int32))

  inputs = {"images": jnp.asarray(r.uniform(size=(8, s, s, 3)), jnp.float32),
            "kd_images": jnp.asarray(r.uniform(size=(8, s, s, 3)), jnp.float32),
            "category_id": jnp.asarray(r.integers(0, 3, 8), jnp.int32)}
  inputs["input_ids"], inputs["attention_mask"] = tokens(8)
  inputs["kd_input_ids"], inputs["kd_attention_mask"] = tokens(8)
  return inputs


@pytest.mark.parametrize("knowledge, scope", [(True, "global"), (True, "per_device")])
def test_gradcache_gradients_equal_the_whole_batch_loss(knowledge, scope):
  """The reference differentiates the whole-batch loss directly, each microbatch's towers normalised
  with that microbatch's BatchNorm statistics (what microbatching changes, and all it changes)."""
  task = _task(2, knowledge, scope)
  state = jax.jit(task.init_state)(jax.random.PRNGKey(0))
  inputs, key = _inputs(task), jax.random.PRNGKey(3)
  (loss, (metrics, stats)), grads = jax.jit(task.microbatched_grads)(state.params, state.batch_stats, inputs, key)

  shards, keys = 2, jax.random.split(key, 2)

  def reference(params):
    streams = ["", "kd_"] if knowledge else [""]
    tower = {"images": inputs["images"], "input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    lengths = {}
    for prefix in streams:
      mask = inputs[f"{prefix}attention_mask"]
      per_row = task._pool_lengths(mask)
      lengths[prefix] = per_row if per_row is not None else jnp.full((8,), jnp.max(jnp.sum(mask, -1)), jnp.int32)
    if knowledge:
      tower.update(kd_images=inputs["kd_images"], kd_input_ids=inputs["kd_input_ids"],
                   kd_attention_mask=inputs["kd_attention_mask"])
    tower["pool"], tower["kd_pool"] = lengths[""], lengths.get("kd_", lengths[""])
    chunks = microbatch.split(tower, 2, shards)
    embs, stats = [], state.batch_stats
    for i in range(2):
      chunk = jax.tree.map(lambda x: x[i], chunks)
      emb, stats = task.embed(params, stats, chunk, keys[i], pool_lengths={"": chunk["pool"], "kd_": chunk["kd_pool"]})
      embs.append(emb)
    merged = microbatch.merge(jax.tree.map(lambda *e: jnp.stack(e), *embs), shards)
    return task.embedding_loss(params, merged, inputs, key)[0], stats

  (ref_loss, ref_stats), ref_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(state.params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    r = dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path]
    # Float32 rounding differs between the two orders of computation: compare at the tensor's scale.
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * max(1.0, float(np.max(np.abs(r)))),
                               err_msg=jax.tree_util.keystr(path))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, ref_stats)


def test_classification_accumulation_is_the_mean_of_microbatch_gradients():
  """CRD-Net (two modalities, BatchNorm statistics threaded through the microbatches in order)."""
  from test_classification import tiny_config
  from jaxretina.train import classification

  config = tiny_config("crd_net", "/nonexistent")
  with config.unlocked():
    config.microbatches = 2
  mesh = distributed.make_mesh("data:2", jax.devices()[:2])
  task = classification.ClassificationTask(config, mesh, np.arange(16) % int(config.data.num_classes))
  state = jax.jit(task.init_state)(jax.random.PRNGKey(0))
  r = np.random.default_rng(0)
  inputs = {name: jnp.asarray(r.normal(size=(8, 32, 32, ch)), jnp.float32) for name, ch in task.fields.items()}
  labels = jnp.asarray(r.integers(0, int(config.data.num_classes), 8), jnp.int32)
  key = jax.random.PRNGKey(5)
  new_state, metrics, grads = jax.jit(task.step_on_inputs)(state, inputs, labels, key)

  @jax.jit
  def reference(params):
    chunks = microbatch.split((inputs, labels), 2, 2)
    stats, total, losses = state.batch_stats, None, []
    for i, k in enumerate(jax.random.split(key, 2)):
      chunk_inputs, chunk_labels = jax.tree.map(lambda x: x[i], chunks)
      (loss, (_, stats, _)), g = jax.value_and_grad(
          lambda p: task.classifier.loss({"params": p, "batch_stats": stats}, state.system_state, chunk_inputs,
                                         chunk_labels, k, 0), has_aux=True)(params)
      losses.append(loss)
      total = g if total is None else jax.tree.map(jnp.add, total, g)
    return jnp.mean(jnp.stack(losses)), jax.tree.map(lambda g: g / 2, total), stats

  ref_loss, ref_grads, ref_stats = reference(state.params)
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.max(np.abs(b))))),
               grads, ref_grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_state.batch_stats, ref_stats)
