"""Config fields declared once (configlib's task-kind bases, each system's model/loss/init sections) and
saved configs read over those declarations (configlib.with_defaults): resume's config guard and
inference.load_config."""

from __future__ import annotations

import copy
import json
import os

import ml_collections
import pytest

from train_utils import REPO_ROOT
from jaxretina import configlib, inference, systems
from jaxretina.configlib import load_config_module
from jaxretina.train import loop

CONFIG_ARGS = [("keepfit", ""), ("keepfit", "paper"), ("keepfit", "knowledge=False"), ("flair", ""), ("flair", "paper"),
               ("dual_attend_med", ""), ("dual_attend_med", "paper"), ("dual_attend_med", "variant=cal"),
               ("crd_net", ""), ("crd_net", "paper"), ("bira_net", ""), ("bira_net", "variant=ra_net"),
               ("fcn_clip", ""), ("fcn_clip", "paper")]


def _config(name: str, arg: str = "") -> ml_collections.ConfigDict:
  return load_config_module(os.path.join(REPO_ROOT, "configs", f"{name}.py")).get_config(arg or None)


def _fields(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _without(fields: dict, *paths: str) -> dict:
  """``fields`` as a config.json written before the dotted ``paths`` were declared."""
  fields = copy.deepcopy(fields)
  for path in paths:
    *parents, leaf = path.split(".")
    node = fields
    for key in parents:
      node = node[key]
    del node[leaf]
  return fields


@pytest.mark.parametrize("name,arg", CONFIG_ARGS)
def test_config_files_only_override_declared_fields(name, arg):
  config = _config(name, arg)
  fields = _fields(config)
  # Read back over the declarations, a config file's config is itself: nothing it sets is lost, and
  # every declared field is present.
  assert _fields(configlib.with_defaults(fields)) == fields
  declared = _fields(configlib.classification_config(config.model.name) if config.task == "classification"
                     else configlib.contrastive_config(config.model.name))
  missing = [path for path in set(loop._flatten(declared)) - set(loop._flatten(fields))
             if not any(path == f or path.startswith(f + ".") for f in configlib.OPEN_FIELDS)]
  assert missing == []


@pytest.mark.parametrize("name", systems.available())
def test_each_system_declares_its_model_section(name):
  module = systems.system_module(name)
  declared = systems.declared_config(name)
  assert declared.model.name == name
  assert set(declared.model) - {"name"} == set(module.model_config())
  if hasattr(module, "loss_config"):
    assert _fields(declared.loss) == _fields(module.loss_config())


def test_with_defaults_fills_fields_a_saved_config_lacks_and_keeps_the_others():
  fields = _fields(_config("dual_attend_med"))
  old = _without(fields, "loss.center_beta", "model.clamp_negative_attention_mass", "augment.hue",
                 "augment.class_conditional", "eval_every_epochs")
  old["evals"] = {"test": {"type": "classification", "split": "test"}}
  old["a_field_no_longer_declared"] = 3
  config = configlib.with_defaults(old)
  assert config.loss.center_beta == 0.05 and config.model.clamp_negative_attention_mass is True
  assert config.augment.hue == 0.0 and list(config.augment.class_conditional.labels) == []
  assert config.eval_every_epochs == 0
  assert config.loss.lambdas == fields["loss"]["lambdas"]
  assert list(config.evals) == ["test"]  # an open field: taken whole, the default evaluator not added
  assert config.a_field_no_longer_declared == 3
  assert isinstance(config.model.backbone_layers, tuple)  # JSON lists become the declared tuples


def test_with_defaults_reads_a_contrastive_config_saved_before_augment_and_knowledge():
  fields = _fields(_config("keepfit"))
  old = _without(fields, "model.name", "model.projection", "model.norm_features", "optimizer.momentum",
                 "schedule.gamma")
  old["augment"] = "flair"
  old["kd"] = old.pop("knowledge")  # the field's name before it was config.knowledge
  config = configlib.with_defaults(old)
  assert config.model.name == "flair" and config.augment.recipe == "flair"
  assert "kd" not in config and config.knowledge.enabled == fields["knowledge"]["enabled"]
  assert _fields(config) == fields


def test_with_defaults_refuses_an_unknown_task_and_names_a_value_of_another_type():
  with pytest.raises(ValueError, match="config.task='regression'"):
    configlib.with_defaults({"task": "regression"})
  fields = _fields(_config("crd_net"))
  fields["loss"]["head_weights"] = "equal"
  with pytest.raises(ValueError, match="config.loss.head_weights='equal'"):
    configlib.with_defaults(fields)


@pytest.mark.parametrize("name", ["dual_attend_med", "keepfit"])
def test_config_guard_does_not_report_a_newly_declared_field_at_its_default(tmp_path, name):
  config = _config(name)
  fields = _fields(config)
  old = _without(fields, "remat", "eval_every_epochs", "model.name" if name == "keepfit" else "loss.aux_margin")
  if name == "keepfit":
    old["augment"] = "flair"
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert loop.check_config_unchanged(config, str(tmp_path)) == old

  # The field at another value than its default is a change, whichever side lacks it.
  with config.unlocked():
    config.seed = config.seed + 1
    config.remat = "blocks"  # changeable on resume: no refusal for this one
  with pytest.raises(loop.ConfigChangedError) as refused:
    loop.check_config_unchanged(config, str(tmp_path))
  assert "seed:" in str(refused.value) and "remat" not in str(refused.value)


def test_an_outdated_config_json_is_rewritten_without_a_history_copy(tmp_path):
  config = _config("bira_net")
  old = _without(_fields(config), "model.dense_width", "loss.detach_loss")
  (tmp_path / "config.json").write_text(json.dumps(old))
  loop._write_config(config, str(tmp_path), old, step=4)
  assert not list(tmp_path.glob("config.*.json"))
  assert json.loads((tmp_path / "config.json").read_text()) == _fields(config)


def test_inference_reads_an_old_config_json_over_the_declared_defaults(tmp_path):
  fields = _fields(_config("crd_net"))
  (tmp_path / "config.json").write_text(json.dumps(_without(fields, "model.skip_stem_maxpool",
                                                            "loss.head_weights")))
  config = inference.load_config(str(tmp_path))
  assert config.model.skip_stem_maxpool is False and list(config.loss.head_weights) == [1.0, 1.0, 1.0]
  assert _fields(config) == fields


def test_contrastive_augment_recipe_is_checked():
  from jaxretina.train import contrastive
  from jaxretina.train.distributed import make_mesh

  config = _config("keepfit")
  with config.unlocked():
    config.augment.recipe = "kornia"
  with pytest.raises(ValueError, match="config.augment.recipe='kornia'"):
    contrastive.ContrastiveTask(config, make_mesh("data:-1"), 64)
