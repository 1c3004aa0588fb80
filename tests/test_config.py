"""Config files and command-line overrides."""

import os

import pytest

from genimg_jax import config as config_lib
from conftest import REPO

CNN = os.path.join(REPO, "experiments", "cnn.py")


def test_overrides_are_typed():
  config = config_lib.apply_overrides(
      config_lib.load_config_file(CNN),
      ["batch_size=64", "optimizer.learning_rate=3e-4", "augment=true",
       "data.image_shape=(32, 32, 3)", "model.name=resnet", "model.width=8",
       "model.blocks_per_stage=(1, 1)"])
  assert config.batch_size == 64 and isinstance(config.batch_size, int)
  assert config.optimizer.learning_rate == pytest.approx(3e-4)
  assert config.augment is True
  assert tuple(config.data.image_shape) == (32, 32, 3)
  assert config.model.name == "resnet"


def test_int_accepted_for_float_field():
  config = config_lib.apply_overrides(config_lib.load_config_file(CNN),
                                      ["optimizer.learning_rate=1"])
  assert config.optimizer.learning_rate == 1.0
  assert isinstance(config.optimizer.learning_rate, float)


def test_unknown_key_lists_valid_keys():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.apply_overrides(config_lib.load_config_file(CNN),
                               ["optimizer.lr=0.1"])
  assert "optimizer.lr" in str(e.value)
  assert "optimizer.learning_rate" in str(e.value)
  assert "batch_size" in str(e.value)


def test_wrong_type_is_an_error():
  with pytest.raises(config_lib.ConfigError, match="batch_size"):
    config_lib.apply_overrides(config_lib.load_config_file(CNN),
                               ["batch_size=many"])


def test_missing_config_file():
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    config_lib.load_config_file("experiments/nope.py")


@pytest.mark.parametrize("override", ["num_steps=True", "batch_size=false",
                                      "optimizer.learning_rate=True"])
def test_a_boolean_for_a_number_is_an_error(override):
  """bool is an int subclass: num_steps=True must not start a 1-step run."""
  with pytest.raises(config_lib.ConfigError, match="boolean"):
    config_lib.apply_overrides(config_lib.load_config_file(CNN), [override])


DCGAN = os.path.join(REPO, "experiments", "dcgan.py")


@pytest.mark.parametrize("override,field", [
    ("gan.loss=hinge", "gan.loss"),
    ("optimizer.generator.learning_rate=0.001",
     "optimizer.generator.learning_rate"),
    ("model.spectral_norm=true", "model.spectral_norm"),
    ("data.name=mnist", "data.name"),
    ("batch_size=32", "batch_size"),
    ("seed=3", "seed"),
])
def test_experiment_defining_changes_are_named(override, field):
  config = config_lib.load_config_file(DCGAN)
  changed = config_lib.apply_overrides(config, [override])
  mismatches = config_lib.fingerprint_mismatches(
      config_lib.model_fingerprint(config),
      config_lib.model_fingerprint(changed))
  assert len(mismatches) == 1 and mismatches[0].startswith(field + ":")
  old, new = str(config_lib._flat_values(config)[field]), override.split(
      "=")[1]
  assert old.lower() in mismatches[0].lower()
  assert new.lower() in mismatches[0].lower()


def test_run_length_evaluation_and_logging_may_change():
  config = config_lib.load_config_file(DCGAN)
  changed = config_lib.apply_overrides(config, [
      "num_steps=10", "eval_every=5", "eval_samples=0", "log_every=1",
      "checkpoint_every=2", "mesh.num_devices=1", "data.idx_dir=/elsewhere",
      "feature_network=x.msgpack", "keep_checkpoints=1",
      "eval_reference_split=train"])
  assert config_lib.fingerprint_mismatches(
      config_lib.model_fingerprint(config),
      config_lib.model_fingerprint(changed)) == []


def test_fingerprints_of_older_checkpoints_are_read():
  config = config_lib.load_config_file(DCGAN)
  old = {"family": "gan", "model": dict(config.model),
         "image_shape": list(config.data.image_shape)}
  current = config_lib.model_fingerprint(config)
  assert config_lib.fingerprint_mismatches(old, current) == []
  other = config_lib.model_fingerprint(config_lib.apply_overrides(
      config, ["model.dropout_rate=0.5"]))
  assert config_lib.fingerprint_mismatches(old, other) == [
      "model.dropout_rate: 0.3 -> 0.5"]


def test_overrides_leave_the_original_config_alone():
  config = config_lib.load_config_file(DCGAN)
  config_lib.apply_overrides(config, ["gan.loss=hinge"])
  assert config.gan.loss == "non_saturating"


def test_configs_load_by_name_from_anywhere(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  by_name = config_lib.load_config_file("dcgan:cifar10")
  assert by_name.data.name == "cifar10"
  assert by_name == config_lib.load_config_file(
      os.path.join(REPO, "experiments", "dcgan.py:cifar10"))
  with pytest.raises(config_lib.ConfigError, match="'ddpm'"):
    config_lib.load_config_file("no_such_config")
