"""Every experiment config on every data set it accepts, in both variants;
the non-default data sets run end to end on TFDS mock data of their shapes."""

import functools
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from genimg_jax import config as config_lib, data, optim, train
from conftest import REPO, tiny_config
from experiments import common

EXPERIMENTS = sorted(
    name for name in os.listdir(os.path.join(REPO, "experiments"))
    if name.endswith(".py") and name not in ("__init__.py", "common.py"))
NEEDS_LABELS = ("cnn.py", "resnet.py", "cgan.py", "vae_cond.py",
                "ddpm_cond.py", "flow_cond.py")


def _load(experiment, arg):
  return config_lib.load_config_file(
      os.path.join(REPO, "experiments", f"{experiment}:{arg}"))


def _train_steps(config, num_examples):
  if config.num_steps:
    return config.num_steps
  return config.num_epochs * (num_examples // config.batch_size)


def test_experiment_list():
  assert EXPERIMENTS == [
      "autoencoder_kl.py", "cgan.py", "cnn.py", "dcgan.py", "ddpm.py",
      "ddpm_cond.py", "dit.py", "flow.py", "flow_cond.py", "hinge_sn.py",
      "latent_dit.py", "resnet.py", "vae_cond.py", "vae_conv.py",
      "vae_mlp.py", "wgan_gp.py"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_data_set_and_variant(experiment):
  for dataset, (tfds_name, _, shape, classes, _) in common.DATASETS.items():
    if experiment in NEEDS_LABELS and not classes:
      with pytest.raises(config_lib.ConfigError, match="DATASET"):
        _load(experiment, dataset)
      continue
    local, full = _load(experiment, f"{dataset},local"), _load(
        experiment, f"{dataset},full")
    assert _load(experiment, dataset).to_dict() == local.to_dict()
    for config in (local, full):
      assert config.data.name == tfds_name
      assert tuple(config.data.image_shape) == shape
      assert config.data.num_classes == classes
      # FID needs a feature network for these images.
      assert bool(config.get("eval_samples")) == bool(
          config.get("feature_network", ""))
      if config.family != "classifier":  # Today's reference: the eval split.
        assert config.eval_reference_split == config.data.eval_split == "test"
    assert _train_steps(full, 50000) > _train_steps(local, 50000)
    # Only the offline default reads IDX files; the rest come through TFDS.
    assert bool(local.data.idx_dir) == (dataset == "fashion_mnist")


# DDPM's CIFAR-10 training (Ho et al. 2020, Appendix B, and its released
# code: TensorFlow's Adam defaults).
DDPM_CIFAR10 = {
    "optimizer.name": "adam",
    "optimizer.learning_rate": 2e-4,
    "optimizer.schedule": "constant",  # After the warm-up.
    "optimizer.warmup_steps": 5000,
    "optimizer.b1": 0.9,
    "optimizer.b2": 0.999,
    "optimizer.weight_decay": 0.0,
    "optimizer.grad_clip": 1.0,
    "batch_size": 128,
    "num_steps": 800000,
    "model.dropout_rate": 0.1,
    "diffusion.ema_decay": 0.9999,
    "diffusion.ema_warmup": False,
    "data.random_flip": True,
}


@pytest.mark.parametrize("experiment", ["ddpm.py", "flow.py"])
def test_cifar10_full_trains_as_ddpm(experiment):
  """Every field of DDPM's CIFAR-10 set-up, and the learning rate and EMA
  decay that the step then uses: 0 -> 2e-4 over 5,000 steps, 0.9999 from
  step 0."""
  config = _load(experiment, "cifar10,full")
  got = {k: functools.reduce(lambda node, name: node[name], k.split("."),
                             config) for k in DDPM_CIFAR10}
  # {field: (this config's, DDPM's)} where they differ.
  assert {k: (v, DDPM_CIFAR10[k]) for k, v in got.items()
          if v != DDPM_CIFAR10[k]} == {}
  lr = optim.learning_rate_schedule(config.optimizer, config.num_steps)
  assert [float(lr(s)) for s in (0, 2500, 5000, 799999)] == pytest.approx(
      [0.0, 1e-4, 2e-4, 2e-4])
  assert float(optim.ema_decay_at(0, config.diffusion.ema_decay,
                                  config.diffusion.ema_warmup)) == (
                                      pytest.approx(0.9999))


def test_random_flip_only_in_full_variants_of_mirrorable_data():
  """Objects and faces, not digits or clothing, and not on CPU-sized runs;
  classifiers flip through augment_flip instead."""
  for experiment in EXPERIMENTS:
    for dataset in common.DATASETS:
      for variant in common.VARIANTS:
        try:
          config = _load(experiment, f"{dataset},{variant}")
        except config_lib.ConfigError:
          continue  # Needs labels.
        want = (variant == "full" and dataset in ("cifar10", "celeb_a64")
                and config.family != "classifier")
        assert config.data.random_flip == want, (experiment, dataset, variant)


def test_bad_config_argument_lists_choices():
  for arg in ("cifar100", "mnist,huge", "mnist,full,x"):
    with pytest.raises(config_lib.ConfigError,
                       match=r"DATASET\[,VARIANT\].*celeb_a64"):
      _load("dcgan.py", arg)


@pytest.mark.parametrize("experiment,arg", [
    ("cnn.py", "cifar10"), ("resnet.py", "mnist,full"),
    ("dcgan.py", "cifar10"), ("hinge_sn.py", "celeb_a64"),
    ("cgan.py", "mnist"), ("vae_conv.py", "cifar10,full"),
    ("vae_mlp.py", "celeb_a64"), ("vae_cond.py", "mnist"),
    ("flow_cond.py", "cifar10")])
def test_trains_on_mock_tfds_data(tmp_path, experiment, arg):
  shrink = {"vae.iw_samples": 2, "model.width": 4, "model.channels": 8,
            "model.multipliers": "(1, 2)", "model.num_res_blocks": 1,
            "diffusion.sample_steps": 2}
  valid = config_lib.flat_keys(_load(experiment, arg))
  if experiment == "cnn.py":  # Its model.width is the ResNet's only.
    valid.remove("model.width")
  config = tiny_config("", f"{experiment}:{arg}", num_steps=2,
                       checkpoint_every=2,
                       **{k: v for k, v in shrink.items() if k in valid})
  workdir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=32):
    _, metrics = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  steps = [r for r in logged if r.pop("split") == "train"]
  assert [r["step"] for r in steps] == [1, 2]
  for record in steps + [metrics]:
    assert all(np.isfinite(v) for v in record.values())
  if config.family != "gan":  # GANs without a feature network: no metric.
    assert metrics
  samples = os.path.join(workdir, "samples")
  if config.family != "classifier":
    name = sorted(os.listdir(samples))[-1]
    with Image.open(os.path.join(samples, name)) as grid:
      assert grid.mode == ("L" if config.data.image_shape[2] == 1 else "RGB")


def test_center_crop_resize_takes_the_centre():
  images = np.zeros((3, 218, 178, 3), np.uint8)
  images[:, 39:179, 19:159] = 200  # The central 140 x 140 square.
  source = data.CenterCropResize(
      data.ArraySource(images, np.arange(3, dtype=np.int32)), 140, (64, 64))
  batch = source.take(np.array([2, 0]))
  assert batch["image"].shape == (2, 64, 64, 3)
  assert batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(batch["image"], 200)
  np.testing.assert_array_equal(batch["label"], [2, 0])


def test_center_crop_larger_than_image_is_refused():
  source = data.CenterCropResize(data.ArraySource(
      np.zeros((1, 28, 28, 1), np.uint8), np.zeros(1, np.int32)), 140, (8, 8))
  with pytest.raises(data.DataError, match="center_crop=140 is larger"):
    source.take(np.array([0]))
