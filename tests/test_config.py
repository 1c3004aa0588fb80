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
       "data.image_shape=(32, 32, 3)", "model.name=resnet"])
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
