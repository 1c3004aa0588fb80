"""`genimg` exposes CPU cores as XLA CPU devices (distributed.use_cpu_cores)."""

import os
import subprocess
import sys

import pytest

from genimg_jax import distributed

PROBE = ("from genimg_jax import distributed; import jax; "
         "print(distributed.use_cpu_cores(), jax.device_count())")


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 2), (3, 2), (6, 4),
                                            (8, 8), (96, 8)])
def test_default_count_is_a_power_of_two_up_to_8(cores, expected):
  assert distributed.default_cpu_device_count(cores) == expected


def _probe(**env_changes):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(env_changes)
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=False,
                       capture_output=True, text=True, timeout=120)
  return out.returncode, out.stdout.split(), out.stderr


def test_env_var_sets_the_device_count():
  rc, words, err = _probe(GENIMG_CPU_DEVICES="3", JAX_PLATFORMS="cpu")
  assert rc == 0, err
  assert words == ["3", "3"]


def test_default_uses_the_cores_of_this_process():
  rc, words, err = _probe(JAX_PLATFORMS="cpu")
  assert rc == 0, err
  expected = distributed.default_cpu_device_count(
      len(os.sched_getaffinity(0)))
  assert words == [str(expected), str(expected)]


def test_explicit_xla_flags_win():
  rc, words, err = _probe(
      GENIMG_CPU_DEVICES="3", JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=5")
  assert rc == 0, err
  assert words == ["None", "5"]


def test_bad_env_value_is_a_clear_error():
  rc, _, err = _probe(GENIMG_CPU_DEVICES="many", JAX_PLATFORMS="cpu")
  assert rc != 0
  assert "GENIMG_CPU_DEVICES='many' must be a positive integer" in err


@pytest.mark.parametrize("env,chose", [
    ({}, "True"), ({"GENIMG_CPU_DEVICES": "2"}, "False"),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, "False")])
def test_only_the_default_count_counts_as_chosen(env, chose):
  probe = ("from genimg_jax import distributed; distributed.use_cpu_cores(); "
           "print(distributed.chose_cpu_devices())")
  clean = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", probe],
                       env={**clean, "JAX_PLATFORMS": "cpu", **env},
                       check=False, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == [chose]


@pytest.mark.parametrize("overrides,chose,expected", [
    ({"mesh.cpu_devices": 1}, True, 1),
    ({"mesh.cpu_devices": 100}, True, 8),  # At most the devices there are.
    ({"mesh.cpu_devices": 0}, True, 0),
    ({"mesh.cpu_devices": 1}, False, 0),  # The user chose the count.
    ({"mesh.cpu_devices": 1, "mesh.num_devices": 4}, True, 4),
    ({"mesh.cpu_devices": 1, "mesh.fsdp": 2}, True, 0)])
def test_mesh_devices_uses_cpu_devices_only_where_genimg_chose(
    monkeypatch, overrides, chose, expected):
  from genimg_jax import train  # pylint: disable=import-outside-toplevel
  from experiments import dcgan  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8
  monkeypatch.setattr(distributed, "_chose_cpu_devices", chose)
  config = dcgan.get_config()
  assert config.mesh.cpu_devices == 1  # The DCGAN's default.
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  assert train.mesh_devices(config) == expected
  assert train.make_mesh(config).devices.size == (expected or 8)
