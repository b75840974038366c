"""The train-step benchmark (figures, --against_torch, per-op profile), paper-shaped synthetic configs
and config.profile_steps."""

from __future__ import annotations

import glob
import math
import os

import jax
import pytest

from jaxretina import profiling, step_bench
from jaxretina.configlib import PAPER_BERT_VOCAB_SIZE, load_config_module
from jaxretina.train import loop
from train_utils import REPO_ROOT, tiny_keepfit_config

PAPER_CONFIGS = ["keepfit", "flair", "dual_attend_med", "crd_net", "bira_net", "fcn_clip"]


def _config(name: str, arg: str):
  return load_config_module(os.path.join(REPO_ROOT, "configs", f"{name}.py")).get_config(arg)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_synthetic_configs_keep_the_paper_model_on_generated_data(name):
  paper, synthetic = _config(name, "paper"), _config(name, "paper,synthetic=True")
  assert synthetic.data.name in ("synthetic_retina", "synthetic_fundus_oct")
  assert synthetic.data.build_if_missing
  assert synthetic.data.builder_kwargs.image_size == paper.data.image_size
  assert synthetic.to_dict()["model"] == paper.to_dict()["model"]
  for field in ("batch_size", "optimizer", "schedule"):
    assert synthetic.to_dict()[field] == paper.to_dict()[field], field
  if synthetic.task == "contrastive":
    assert synthetic.text.bert.vocab_size == PAPER_BERT_VOCAB_SIZE
    assert synthetic.text.tokenizer == "embedded" and not synthetic.text.pretrained_dir
  with synthetic.unlocked():
    synthetic.data.image_size = 96  # the generated images follow an override of the resolution
  assert synthetic.data.builder_kwargs.image_size == 96


def test_synthetic_without_paper_is_an_error_that_says_how_to_spell_it():
  with pytest.raises(ValueError, match=r"keepfit.py:paper,synthetic=True"):
    _config("keepfit", "synthetic=True")


def test_paper_synthetic_text_tower_is_bert_base_with_the_clinical_vocabulary(tmp_path):
  from jaxretina.systems import flair as two_tower

  config = _config("flair", "paper,synthetic=True")
  tokenizer = two_tower.build_tokenizer(config.text)
  text = two_tower.build_text_config(config.text, tokenizer)
  assert (text.vocab_size, text.hidden_size, text.num_hidden_layers) == (PAPER_BERT_VOCAB_SIZE, 768, 12)
  assert tokenizer.vocab_size <= text.vocab_size  # every embedded token id has a row


def test_benchmark_reports_flops_profile_and_a_same_run_torch_ratio(tmp_path):
  config = tiny_keepfit_config(str(tmp_path / "data"), steps=100)
  result = step_bench.benchmark(config, steps=2, warmup=1, min_cpu_share=0.0, profile_top=5,
                           profile_dir=str(tmp_path / "profile"), against_torch=True)
  assert result["img_per_s"] > 0 and result["compile_s"] > 0
  assert result["model_tflop_per_step"] > 0
  assert result["loss_finite"]
  # The reference has the same towers: parameter counts agree to well under 1 %.
  assert abs(result["torch_parameters"] - result["jaxretina_parameters"]) < 0.01 * result["jaxretina_parameters"]
  assert result["torch_step_s_median"] > 0 and result["speed_jaxretina_over_torch"] > 0
  categories = {row["category"] for row in result["profile_summary"]["categories"]}
  assert categories and sum(row["seconds_per_step"] for row in result["profile_summary"]["top_ops"]) > 0
  assert os.path.exists(result["profile"])
  assert "s/step" in result["_profile_tables"]


def test_profile_steps_writes_a_trace_of_the_chosen_steps(tmp_path):
  config = tiny_keepfit_config(str(tmp_path / "data"), steps=3)
  with config.unlocked():
    config.profile_steps = "2,3"
    config.evals = {}
  loop.train_and_evaluate(config, str(tmp_path / "run"))
  traces = glob.glob(str(tmp_path / "run" / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert len(traces) == 1
  rows = profiling.top_ops(traces[0], steps=2)
  assert rows and all(r.seconds_per_step >= 0 for r in rows)


@pytest.mark.parametrize("spec", ["3", "0,2", "5,4", "a,b"])
def test_profile_steps_rejects_a_bad_range_naming_the_field(spec):
  with pytest.raises(ValueError, match="config.profile_steps"):
    profiling.parse_step_range(spec)


def test_mfu_peak_table_matches_device_kinds():
  class Device:
    def __init__(self, kind):
      self.device_kind = kind

  assert profiling.peak_flops_per_device(Device("NVIDIA H200"), "bfloat16") == 989e12
  assert profiling.peak_flops_per_device(Device("TPU v5 lite"), "bfloat16") == 197e12
  assert profiling.peak_flops_per_device(Device("cpu"), "float32") is None
  assert profiling.peak_flops_per_device(jax.devices()[0], "float32") is None


@pytest.mark.parametrize("name", ["dual_attend_med", "crd_net"])
def test_classification_torch_references_have_our_parameter_count(tmp_path, name):
  from test_classification import tiny_config

  from jaxretina import bench_torch
  from jaxretina.train import distributed

  config = tiny_config(name, str(tmp_path / "data"), steps=100)
  mesh = distributed.make_mesh(config.mesh)
  task = loop.get_task(config, mesh)
  batch = jax.device_get(loop.next_batch(task.data_streams(mesh), mesh))
  ours = sum(int(x.size) for x in jax.tree.leaves(jax.eval_shape(task.init_state, jax.random.PRNGKey(0)).params))
  step, torch_parameters, _ = bench_torch.reference_step(config, batch, task)
  assert torch_parameters == ours
  assert math.isfinite(step())  # the reference step runs
