"""Bad config values: every command refuses them before anything compiles or
is written, with one line per value that names the field, exit code 2."""

import json
import os
import subprocess
import sys

import pytest

from genimg_jax import cli, config as config_lib
from conftest import REPO

GENIMG = os.path.join(os.path.dirname(sys.executable), "genimg")

# (config, overrides, field named, words of what is allowed)
BAD_VALUES = [
    ("dcgan", ["batch_size=-4"], "batch_size", ">= 1"),
    ("cnn", ["num_steps=-1"], "num_steps", ">= 0"),
    ("cnn", ["optimizer.learning_rate=-1"], "optimizer.learning_rate", "> 0"),
    ("cnn", ["optimizer.learning_rate=0"], "optimizer.learning_rate", "> 0"),
    ("dcgan", ["eval_samples=-5"], "eval_samples", ">= 0"),
    ("cnn", ["model.dtype=float8"], "model.dtype", "'bfloat16'"),
    ("vae_conv", ["vae.iw_samples=-1"], "vae.iw_samples", ">= 0"),
    ("dcgan", ["optimizer.generator.learning_rate=-0.1"],
     "optimizer.generator.learning_rate", "> 0"),
    ("dcgan", ["gan.loss=wasserstein"], "gan.loss", "'wgan_gp'"),
    ("wgan_gp", ["gan.n_critic=0"], "gan.n_critic", ">= 1"),
    ("dcgan", ["gan.ema_decay=1.5"], "gan.ema_decay", "[0, 1)"),
    ("dcgan", ["model.dropout_rate=1.0"], "model.dropout_rate", "[0, 1)"),
    ("vae_conv", ["vae.latent_dim=0"], "vae.latent_dim", ">= 1"),
    ("vae_conv", ["vae.likelihood=gaussian"], "vae.likelihood", "'logistic'"),
    ("ddpm", ["diffusion.objective=x0"], "diffusion.objective", "'flow'"),
    ("ddpm", ["diffusion.sampler=euler"], "diffusion.sampler",
     "samples with one of 'ddpm', 'ddim'"),
    ("ddpm", ["diffusion.sample_steps=0"], "diffusion.sample_steps", ">= 1"),
    ("ddpm", ["diffusion.num_timesteps=1"], "diffusion.num_timesteps", ">= 2"),
    ("dit", ["model.patch_size=3"], "model.patch_size",
     "not divisible into 3 x 3 patches"),
    ("dit", ["model.name=resnet"], "model.name",
     "the diffusion family's networks are 'unet', 'dit'"),
    ("cnn", ["data.image_shape=(28, 28, 2)"], "data.image_shape",
     "channels 1 or 3"),
    ("cnn", ["data.num_classes=-1"], "data.num_classes", ">= 0"),
    ("cnn", ["mesh.num_devices=-2"], "mesh.num_devices", ">= 0"),
    ("cnn", ["log_every=0"], "log_every", ">= 1"),
    ("cnn", ["checkpoint_every=0"], "checkpoint_every", ">= 1"),
    ("cnn", ["keep_checkpoints=0"], "keep_checkpoints", ">= 1"),
    ("cnn", ["optimizer.schedule=linear"], "optimizer.schedule", "'cosine'"),
    ("cnn", ["num_steps=0", "num_epochs=0"], "num_steps", "nothing to train"),
    ("cnn", ["xla_cpu_ynn_fusions_kept=conv"], "xla_cpu_ynn_fusions_kept",
     "unknown YNNPACK fusion types ['conv']"),
    ("ddpm", ["optimizer.momentum=0.9"], "optimizer.momentum",
     "adam has no momentum"),
    ("flow", ["diffusion.eta=0.5"], "diffusion.eta", "only the ddim sampler"),
    ("dcgan", ["gan.gp_weight=5"], "gan.gp_weight", "gradient penalty"),
    ("ddpm", ["diffusion.guidance_scale=2"], "diffusion.guidance_scale",
     "not class-conditional"),
    ("dit", ["model.learn_sigma=true", "diffusion.objective=flow",
             "diffusion.sampler=euler"], "model.learn_sigma",
     "needs diffusion.objective='eps', not 'flow'"),
    ("dit", ["model.learn_sigma=true", "diffusion.objective=v"],
     "model.learn_sigma", "needs diffusion.objective='eps', not 'v'"),
    ("dit", ["model.learn_sigma=true", "model.name=unet"],
     "model.learn_sigma", "only the DiT learns the variance"),
    ("dit", ["model.learn_sigma=true", "diffusion.sampler=ddpm",
             "diffusion.ddpm_variance=fixedlarge"], "diffusion.ddpm_variance",
     "takes the learned variance"),
    ("autoencoder_kl", ["autoencoder.disc_weight=-0.5"],
     "autoencoder.disc_weight", ">= 0"),
    ("autoencoder_kl", ["autoencoder.disc_weight=0.5",
                        "autoencoder.disc_start=-1"],
     "autoencoder.disc_start", ">= 0"),
    ("autoencoder_kl", ["autoencoder.disc_weight=0.5",
                        "autoencoder.disc_layers=0"],
     "autoencoder.disc_layers", ">= 1"),
    ("autoencoder_kl", ["autoencoder.disc_weight=0.5",
                        "autoencoder.disc_channels=0"],
     "autoencoder.disc_channels", ">= 1"),
    ("autoencoder_kl", ["autoencoder.disc_weight=0.5",
                        "autoencoder.disc_loss=wgan"],
     "autoencoder.disc_loss", "'hinge', 'vanilla'"),
    ("autoencoder_kl", ["autoencoder.disc_start=100"],
     "autoencoder.disc_start", "the discriminator is off"),
]


def _one_error_line(err: str, field: str, allowed: str):
  lines = [l for l in err.splitlines() if l.strip()]
  named = [l for l in lines if f"{field}=" in l]
  assert len(named) == 1, err
  assert allowed in named[0], named[0]
  assert "Traceback" not in err


@pytest.mark.parametrize("experiment,overrides,field,allowed", BAD_VALUES,
                         ids=[" ".join(r[1]) for r in BAD_VALUES])
def test_train_refuses_a_bad_value_before_writing_anything(
    tmp_path, capsys, experiment, overrides, field, allowed):
  workdir = tmp_path / "run"
  code = cli.main(["train", "--config", experiment, "--workdir", str(workdir),
                   *[f"--config.{o}" for o in overrides]])
  assert code == 2
  _one_error_line(capsys.readouterr().err, field, allowed)
  assert not workdir.exists()  # No config.json, no checkpoint, no lock.


def _workdir_of(tmp_path, experiment):
  """A workdir holding only the config.json of `experiment` (enough for
  the commands that read a workdir to check their overrides)."""
  workdir = tmp_path / experiment
  workdir.mkdir()
  config = config_lib.load_config_file(experiment)
  (workdir / "config.json").write_text(config.to_json_best_effort())
  return str(workdir)


@pytest.mark.parametrize("command,field,allowed", [
    (lambda w, o: ["eval", "--workdir", w(("cnn")),
                   "--config.eval_batch_size=0"], "eval_batch_size", ">= 1"),
    (lambda w, o: ["sample", "--workdir", w("ddpm"), "--output", o,
                   "--config.diffusion.eta=-1"], "diffusion.eta", ">= 0"),
    (lambda w, o: ["compile", "--config", "cnn", "--config.batch_size=0"],
     "batch_size", ">= 1"),
    (lambda w, o: ["fid-stats", "--config", "dcgan", "--output", o,
                   "--config.eval_batch_size=-8"], "eval_batch_size", ">= 1"),
    (lambda w, o: ["bench", "--model", "cnn", "--batch", "-4", "--output",
                   ""], "batch_size", ">= 1"),
    (lambda w, o: ["bench", "--model", "dcgan", "--output", "",
                   "--config.gan.z_dim=0"], "gan.z_dim", ">= 1"),
], ids=["eval", "sample", "compile", "fid-stats", "bench --batch",
        "bench override"])
def test_every_command_refuses_bad_values(tmp_path, capsys, command, field,
                                          allowed):
  output = str(tmp_path / "out.png")
  args = command(lambda name: _workdir_of(tmp_path, name), output)
  assert cli.main(args) == 2
  _one_error_line(capsys.readouterr().err, field, allowed)
  assert not os.path.exists(output)


def test_all_bad_values_are_listed_at_once(tmp_path, capsys):
  assert cli.main(["train", "--config", "dcgan", "--workdir",
                   str(tmp_path / "run"), "--config.batch_size=0",
                   "--config.gan.z_dim=-1", "--config.model.dtype=half"]) == 2
  err = capsys.readouterr().err
  assert "3 bad config values" in err
  for field in ("batch_size=0", "gan.z_dim=-1", "model.dtype='half'"):
    assert sum(field in line for line in err.splitlines()) == 1, err


@pytest.mark.parametrize("experiment,overrides", [
    ("cnn", ["num_steps=0", "num_epochs=1"]),
    ("dcgan", ["eval_samples=0", "batch_size=1", "gan.ema_decay=0"]),
    ("cnn", ["optimizer.name=sgd", "optimizer.momentum=0"]),
    ("dcgan", ["model.dropout_rate=0"]),
    ("vae_conv", ["vae.iw_samples=0", "vae.beta=0"]),
    ("ddpm", ["diffusion.eta=0", "diffusion.sample_steps=1",
              "diffusion.num_timesteps=2", "optimizer.warmup_steps=0",
              "optimizer.grad_clip=0"]),
    ("ddpm_cond", ["diffusion.guidance_scale=0"]),
    ("wgan_gp", ["gan.gp_weight=0", "gan.n_critic=1"]),
    ("cnn", ["mesh.num_devices=0", "seed=0", "xla_cpu_ynn_fusions_kept="]),
    ("autoencoder_kl", ["autoencoder.disc_weight=0"]),
    ("autoencoder_kl", ["autoencoder.disc_weight=0.5",
                        "autoencoder.disc_start=0",
                        "autoencoder.disc_layers=1",
                        "autoencoder.disc_loss=vanilla"]),
])
def test_values_at_the_boundary_are_accepted(experiment, overrides):
  config_lib.apply_overrides(config_lib.load_config_file(experiment),
                             overrides)


def test_every_packaged_config_is_valid_and_every_field_has_a_rule():
  names = [f[:-3] for f in os.listdir(os.path.join(REPO, "experiments"))
           if f.endswith(".py") and f not in ("__init__.py", "common.py")]
  from experiments import common  # pylint: disable=g-import-not-at-top
  checked = 0
  for name in names:
    for dataset in common.DATASETS:
      for variant in common.VARIANTS:
        try:
          config = config_lib.load_config_file(f"{name}:{dataset},{variant}")
        except config_lib.ConfigError:
          continue  # A data set this experiment does not take.
        assert config_lib.config_problems(config) == [], (name, dataset,
                                                           variant)
        checked += 1
  assert checked >= 40


def test_a_field_nothing_reads_is_refused():
  config = config_lib.load_config_file("cnn")
  with config.unlocked():
    config.optimizer.lr = 0.1
  with pytest.raises(config_lib.ConfigError, match="optimizer.lr=0.1: not a "
                     "field genimg reads"):
    config_lib.validate(config)


def test_the_command_exits_2_with_one_line_and_no_traceback(tmp_path):
  """The batch-size case of a real process: before validation it compiled,
  ran a step and then hung in XLA's thread pool at exit (the step dispatched
  with the bad batch never finished), killed with 137."""
  workdir = tmp_path / "run"
  out = subprocess.run([GENIMG, "train", "--config", "dcgan", "--workdir",
                        str(workdir), "--config.batch_size=-4"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines() == [
      "genimg train: error: bad config value: batch_size=-4: expected an "
      "integer >= 1 (the global batch, over all devices)"]
  assert not workdir.exists()


def test_a_typo_in_a_config_path_is_not_the_packaged_config(tmp_path):
  for path in (str(tmp_path / "dcgan.py"), "/my/configs/dcgan.py",
               "dcgan.py", "configs/dcgan"):
    with pytest.raises(config_lib.ConfigError, match="does not exist") as e:
      config_lib.load_config_file(path)
    assert "--config dcgan)" in str(e.value)
  (tmp_path / "dcgan").mkdir()
  with pytest.raises(config_lib.ConfigError, match="is a directory"):
    config_lib.load_config_file(str(tmp_path / "dcgan"))
  assert config_lib.load_config_file("dcgan:cifar10").data.name == "cifar10"


def test_num_workers_may_change_on_resume():
  config = config_lib.load_config_file("cnn")
  changed = config_lib.apply_overrides(config, ["data.num_workers=3"])
  assert config_lib.fingerprint_mismatches(
      config_lib.model_fingerprint(config),
      config_lib.model_fingerprint(changed)) == []


@pytest.mark.parametrize("experiment", ["ddpm", "dit", "flow", "ddpm_cond"])
def test_remat_may_change_on_resume_and_takes_three_values(experiment):
  config = config_lib.load_config_file(experiment)
  assert config.model.remat == "none"
  changed = config_lib.apply_overrides(config, ["model.remat=blocks"])
  config_lib.validate(changed)
  assert config_lib.fingerprint_mismatches(
      config_lib.model_fingerprint(config),
      config_lib.model_fingerprint(changed)) == []
  with pytest.raises(config_lib.ConfigError, match="model.remat"):
    config_lib.validate(config_lib.apply_overrides(config,
                                                   ["model.remat=some"]))
