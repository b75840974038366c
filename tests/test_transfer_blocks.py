"""Transfer-evaluation building blocks: FLAIR's splits, the linear probe, CLIP-/Tip-Adapter (jaxretina.transfer)."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretina.transfer import adapters, linear_probe, splits

TARGETS = ("normal", "glaucoma", "cataract")


def _rows():
  """A fabricated dataframe: 13 / 7 / 5 rows per class, ids in row order, categories as CSV literals."""
  labels = [0] * 13 + [1] * 7 + [2] * 5
  random.Random(123).shuffle(labels)  # interleave the classes in dataframe order
  return [{"image": f"img_{i:02d}.png", "categories": repr([TARGETS[c], "extra finding"])}
          for i, c in enumerate(labels)]


def _upstream_split(rows, targets, shots_train, shots_val, shots_test, seed):
  """``get_dataloader_splits``' selection, written as upstream writes it (global ``random``, np.argwhere)."""

  def get_shots(shots_str, n):
    if "%" in str(shots_str):
      return int(int(shots_str[:-1]) / 100 * n)
    return int(shots_str)

  targets_dict = {name: i for i, name in enumerate(targets)}
  data = [{"image_path": r["image"], "label": targets_dict[eval(r["categories"])[0]]} for r in rows]
  state = random.getstate()
  try:
    random.seed(seed)
    random.shuffle(data)
  finally:
    random.setstate(state)
  labels = [d["label"] for d in data]
  data_train, data_val, data_test = [], [], []
  for i_label in np.unique(labels):
    idx = list(np.squeeze(np.argwhere(labels == i_label)))
    train_samples = get_shots(shots_train, len(idx))
    val_samples = get_shots(shots_val, len(idx))
    test_samples = get_shots(shots_test, len(idx))
    [data_test.append(data[i]) for i in idx[:test_samples]]
    [data_train.append(data[i]) for i in idx[test_samples:test_samples + train_samples]]
    [data_val.append(data[i]) for i in idx[test_samples + train_samples:test_samples + train_samples + val_samples]]
  as_pairs = lambda part: [(d["image_path"], d["label"]) for d in part]
  return {"train": as_pairs(data_train), "val": as_pairs(data_val), "test": as_pairs(data_test)}


@pytest.mark.parametrize("shots", [("80%", "0%", "20%"), ("60%", "10%", "30%"), ("3", "1", "20%"), (2, 0, "50%")])
@pytest.mark.parametrize("seed", [0, 3])
def test_split_matches_upstream_loop(shots, seed):
  rows = _rows()
  got = splits.split_rows(rows, TARGETS, shots_train=shots[0], shots_val=shots[1], shots_test=shots[2], seed=seed)
  want = _upstream_split(rows, TARGETS, *shots, seed=seed)
  for part in ("train", "val", "test"):
    assert [(s.id, s.label) for s in got[part]] == want[part], part


def test_split_known_selection():
  """Frozen ids (computed once with upstream's loop) guard against any change in the generator calls."""
  rows = [(f"r{i}", [TARGETS[i % 2]]) for i in range(8)]
  got = splits.split_rows(rows, TARGETS[:2], shots_train="25%", shots_val="25%", shots_test="50%", seed=0)
  assert [tuple(s) for s in got["test"]] == [("r4", 0), ("r2", 0), ("r1", 1), ("r5", 1)]
  assert [tuple(s) for s in got["train"]] == [("r0", 0), ("r3", 1)]
  assert [tuple(s) for s in got["val"]] == [("r6", 0), ("r7", 1)]


def test_shots_percent_and_k_shot():
  assert splits.get_shots("29%", 100) == 28  # upstream's float order: 29 / 100 * 100 = 28.999…
  assert splits.get_shots("20%", 7) == 1 and splits.get_shots("100%", 13) == 13
  assert splits.get_shots(5, 3) == 5 and splits.get_shots("4", 30) == 4
  with pytest.raises(ValueError, match="shots"):
    splits.get_shots("12.5%", 10)
  rows = _rows()
  k_shot = splits.split_rows(rows, TARGETS, shots_train=4, shots_val=0, shots_test="20%", seed=1)
  assert np.bincount([s.label for s in k_shot["train"]]).tolist() == [4, 4, 4]
  assert np.bincount([s.label for s in k_shot["test"]]).tolist() == [2, 1, 1]  # int(0.2·13), int(0.2·7), int(0.2·5)
  pct = splits.split_rows(rows, TARGETS, shots_train="50%", shots_val="0%", shots_test="20%", seed=1)
  assert np.bincount([s.label for s in pct["train"]]).tolist() == [6, 3, 2]
  ids = [s.id for part in pct.values() for s in part]
  assert len(ids) == len(set(ids))


def test_folds_differ_and_are_seeded_by_index():
  rows = _rows()
  folds = splits.fold_splits(rows, TARGETS, folds=3, shots_train="60%", shots_val="0%", shots_test="40%")
  tests = [tuple(s.id for s in f["test"]) for f in folds]
  assert len(set(tests)) == 3
  assert folds[2] == splits.split_rows(rows, TARGETS, shots_train="60%", shots_val="0%", shots_test="40%", seed=2)


def test_split_input_errors_and_experiments():
  with pytest.raises(ValueError, match="row 1.*'drusen' is not a target"):
    splits.labelled_rows([("a", ["normal"]), ("b", ["drusen"])], TARGETS)
  with pytest.raises(ValueError, match="row 0"):
    splits.labelled_rows([{"image": "a"}], TARGETS)
  assert splits.labelled_rows([("a", "['glaucoma']")], {"glaucoma": 1, "no glaucoma": 0}) == [splits.Sample("a", 1)]
  assert splits.EXPERIMENTS["08_ODIR200x3"] == ("08_ODIR200x3.csv", ("normal", "pathologic myopia", "cataract"))
  assert splits.EXPERIMENTS["AMD"].targets == ("age related macular degeneration", "normal")
  assert splits.EXPERIMENTS["02_MESSIDOR"].targets[4] == "proliferative diabetic retinopathy"


@pytest.mark.parametrize("counts", [(40, 12), (30, 10, 20, 6)])
def test_linear_probe_matches_sklearn(counts):
  from sklearn.linear_model import LogisticRegression

  rng = np.random.default_rng(len(counts))
  d = 24
  y = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
  means = rng.normal(0.0, 1.0, (len(counts), d))
  x = (0.5 * means[y] + rng.normal(0.0, 1.0, (y.size, d))).astype(np.float32)
  x_test = rng.normal(0.0, 1.0, (40, d)).astype(np.float32)
  ref = LogisticRegression(random_state=0, C=0.316, max_iter=1000, class_weight="balanced").fit(x, y)
  probe = linear_probe.fit(x, y)
  assert bool(probe.converged)
  assert probe.coef.shape == ref.coef_.shape and probe.intercept.shape == ref.intercept_.shape
  np.testing.assert_allclose(np.asarray(probe.predict_proba(x)), ref.predict_proba(x), atol=1e-3)
  np.testing.assert_allclose(np.asarray(probe.predict_proba(x_test)), ref.predict_proba(x_test), atol=1e-3)
  # Test-time augmentation: scores averaged over passes before the activation.
  passes = np.stack([x_test, x_test + 0.1])
  scores = np.asarray(probe.decision_function(passes)).mean(0)
  assert np.allclose(np.asarray(probe.predict_proba(passes)).argmax(-1), scores.argmax(-1) if scores.shape[-1] > 1
                     else (scores[:, 0] > 0).astype(int))
  with pytest.raises(ValueError, match="two classes"):
    linear_probe.fit(x[:5], np.zeros(5, np.int64))


def _few_shot_problem(seed=0, shots=8, k=4, d=16):
  """Tight class clusters; each prototype leans towards the next class, so zero-shot errs systematically."""
  rng = np.random.default_rng(seed)
  means = rng.normal(0.0, 1.0, (k, d))
  means /= np.linalg.norm(means, axis=1, keepdims=True)

  def sample(n_per_class):
    y = np.repeat(np.arange(k), n_per_class)
    x = means[y] + rng.normal(0.0, 0.12, (y.size, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

  protos = means + 0.9 * np.roll(means, -1, axis=0) + rng.normal(0.0, 0.1, (k, d))
  protos = (protos / np.linalg.norm(protos, axis=1, keepdims=True)).astype(np.float32)
  return sample(shots), sample(50), protos


def test_adapters_improve_over_zero_shot():
  (x_train, y_train), (x_test, y_test), protos = _few_shot_problem()
  s = np.log(1 / 0.07)
  acc = lambda probs: float(np.mean(np.argmax(np.asarray(probs), -1) == y_test))
  zero_shot = acc(adapters.zero_shot_proba(x_test, protos, s))
  assert zero_shot < 0.7
  clip = adapters.fit_clip_adapter(jax.random.key(0), x_train, y_train, protos, s)
  tip_f = adapters.fit_tip_adapter_f(x_train, y_train, protos, s)
  assert clip.losses.shape == (40,) and float(clip.losses[-1]) < float(clip.losses[0])
  assert float(tip_f.losses[-1]) < float(tip_f.losses[0])
  assert acc(clip.predict_proba(x_test)) >= zero_shot + 0.1
  assert acc(tip_f.predict_proba(x_test)) >= zero_shot + 0.1


def test_tip_adapter_alpha_zero_is_scaled_zero_shot_and_lr_zero_keeps_cache():
  (x_train, y_train), (x_test, _), protos = _few_shot_problem(seed=1, shots=3)
  s = 2.3
  tip0 = adapters.fit_tip_adapter(x_train, y_train, protos, alpha=0.0)
  want = np.asarray(adapters.zero_shot_logits(x_test, protos, s)) * 100.0 / np.exp(s)
  np.testing.assert_allclose(np.asarray(tip0.logits(x_test)), want, rtol=1e-5, atol=1e-4)
  cache = adapters.fit_tip_adapter(x_train, y_train, protos)
  frozen = adapters.fit_tip_adapter_f(x_train, y_train, protos, s, lr=0.0, epochs=2)
  np.testing.assert_allclose(np.asarray(frozen.logits(x_test)), np.asarray(cache.logits(x_test)), rtol=1e-6)
  upstream = adapters.fit_tip_adapter_f(x_train, y_train, protos, s, epochs=2, tip_f_train_test_mismatch=True,
                                        tip_f_inputs_track_keys=True)
  paper = adapters.fit_tip_adapter_f(x_train, y_train, protos, s, epochs=2)
  assert not np.allclose(np.asarray(upstream.keys), np.asarray(paper.keys))
  with pytest.raises(ValueError, match="logit_scale"):
    adapters.fit_tip_adapter_f(x_train, y_train, protos, tip_f_train_test_mismatch=True)
  with pytest.raises(ValueError, match=r"labels must be .* \[0, 4\)"):
    adapters.fit_tip_adapter(x_train, y_train + 4, protos)


def test_clip_adapter_matches_torch_loop():
  """Two epochs of upstream's ``ClipAdapter.train`` (AdamW, per-sample cosine, fixed order) in torch."""
  torch = pytest.importorskip("torch")
  (x_train, y_train), _, protos = _few_shot_problem(seed=2, shots=2, d=8)
  s, epochs = 2.0, 2
  fitted = adapters.fit_clip_adapter(jax.random.key(3), x_train, y_train, protos, s, epochs=epochs)
  init = adapters.ClipAdapter().init(jax.random.key(3), jnp.asarray(x_train[:1]))["params"]

  adapter = torch.nn.Sequential(torch.nn.Linear(8, 2, bias=False), torch.nn.ReLU(), torch.nn.Linear(2, 8, bias=False),
                                torch.nn.ReLU()).double()
  with torch.no_grad():
    adapter[0].weight.copy_(torch.tensor(np.asarray(init["down"]["kernel"]).T))
    adapter[2].weight.copy_(torch.tensor(np.asarray(init["up"]["kernel"]).T))
  n = x_train.shape[0]
  optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3, eps=1e-4)
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * n)
  x_t, y_t, p_t = (torch.tensor(x_train, dtype=torch.float64), torch.tensor(y_train),
                   torch.tensor(protos, dtype=torch.float64))
  order = adapters.sample_order(n)
  for _ in range(epochs):
    for i in order:
      xb = x_t[i:i + 1]
      xb = 0.2 * adapter(xb) + 0.8 * xb
      xb = xb / xb.norm(dim=-1, keepdim=True)
      loss = torch.nn.functional.cross_entropy(np.exp(s) * xb @ p_t.t(), y_t[i:i + 1])
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      scheduler.step()
  np.testing.assert_allclose(np.asarray(fitted.params["down"]["kernel"]), adapter[0].weight.detach().numpy().T,
                             atol=2e-5)
  np.testing.assert_allclose(np.asarray(fitted.params["up"]["kernel"]), adapter[2].weight.detach().numpy().T, atol=2e-5)


def test_sample_order_and_batching():
  n = 11
  legacy = np.arange(n)
  state = random.getstate()
  try:
    random.seed(42)
    random.shuffle(legacy)  # upstream shuffles a numpy arange with the global generator
  finally:
    random.setstate(state)
  assert adapters.sample_order(n).tolist() == legacy.tolist()
  (x_train, y_train), (x_test, _), protos = _few_shot_problem(seed=3, shots=3)  # N = 12, batches of 5: one short
  fitted = adapters.fit_clip_adapter(jax.random.key(0), x_train, y_train, protos, 2.0, epochs=3, batch_size=5)
  assert np.all(np.isfinite(np.asarray(fitted.losses)))
  with pytest.raises(ValueError, match="permutation"):
    adapters.fit_clip_adapter(jax.random.key(0), x_train, y_train, protos, 2.0, epochs=1, order=[0] * 12)
  x2, y2 = adapters.stack_augmented(np.stack([x_test, x_test]), np.zeros(x_test.shape[0], np.int64))
  assert x2.shape == (2 * x_test.shape[0], x_test.shape[1]) and y2.shape == (2 * x_test.shape[0],)
