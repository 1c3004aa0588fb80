"""The `genimg` command explains itself: --version, configs, --print-config."""

import os

import pytest

from genimg_jax import cli


def test_version_names_the_package_and_jax(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["--version"])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("genimg-jax ") and "jax " in out


def test_configs_lists_every_packaged_config(capsys):
  assert cli.main(["configs"]) == 0
  out = capsys.readouterr().out
  names = [line.split()[0] for line in out.splitlines()
           if line and not line.startswith("data sets")]
  assert {"cnn", "dcgan", "ddpm", "flow", "vae_conv", "dit"} <= set(names)
  assert "common" not in names and "folder:PATH" in out


def test_print_config_shows_the_overrides_and_writes_nothing(
    capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.main(["train", "--config", "dcgan", "--print-config",
                   "--config.num_steps=7"]) == 0
  assert "num_steps: 7" in capsys.readouterr().out
  assert os.listdir(tmp_path) == []
  # A bad value is still refused, and a run needs a workdir.
  assert cli.main(["train", "--config", "dcgan", "--print-config",
                   "--config.num_steps=-1"]) == 2
  assert cli.main(["train", "--config", "dcgan"]) == 2
  assert "--workdir" in capsys.readouterr().err
