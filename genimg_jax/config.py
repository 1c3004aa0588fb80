"""Loading experiment configs and applying `--config.a.b=value` overrides.

A config is a Python file in `experiments/` whose `get_config()` returns an
`ml_collections.ConfigDict` (the flax examples' convention). Overrides are typed
by the field they replace, and an unknown key fails at once with the valid keys.
"""

from __future__ import annotations

import ast
import copy
import json
import importlib.util
import os
import sys
from collections.abc import Iterable

import ml_collections


class ConfigError(ValueError):
  """A config file or an override that cannot be used, with what to do."""


def split_config_arg(path: str) -> tuple[str, str]:
  """"experiments/x.py:ARG" -> ("experiments/x.py", "ARG"); no colon: ""."""
  if not os.path.isfile(path) and ":" in os.path.basename(path):
    path, arg = path.rsplit(":", 1)
    return path, arg
  return path, ""


def packaged_experiments_dir() -> str:
  """The directory of the experiment configs installed with genimg_jax (the
  repo's experiments/, shipped in the wheel as genimg_jax.experiments)."""
  import genimg_jax.experiments  # pylint: disable=g-import-not-at-top
  return os.path.dirname(os.path.abspath(genimg_jax.experiments.__file__))


def resolve_config_path(path: str) -> str:
  """`path` if it is a file, else the installed config of that name
  ("ddpm", "ddpm.py" or "experiments/ddpm.py"), else ConfigError."""
  if os.path.isfile(path):
    return path
  name = os.path.basename(path)
  name = name if name.endswith(".py") else name + ".py"
  packaged = os.path.join(packaged_experiments_dir(), name)
  if os.path.isfile(packaged):
    return packaged
  configs = sorted(f[:-3] for f in os.listdir(packaged_experiments_dir())
                   if f.endswith(".py") and f not in ("__init__.py",
                                                      "common.py"))
  raise ConfigError(
      f"Config file {path!r} does not exist, and no installed config is named "
      f"{name!r}. Pass a config file, or the name of one of {configs}: for "
      "example --config cnn (or experiments/cnn.py:mnist for another data "
      "set).")


def _make_experiments_importable(config_dir: str) -> None:
  """Configs import their siblings as `from experiments import common`: put
  the directory above `config_dir` on sys.path, or, for the installed
  configs, alias `experiments` to genimg_jax.experiments."""
  if config_dir == packaged_experiments_dir() and (
      "experiments" not in sys.modules
      and importlib.util.find_spec("experiments") is None):
    import genimg_jax.experiments  # pylint: disable=g-import-not-at-top
    sys.modules["experiments"] = genimg_jax.experiments
    return
  root = os.path.dirname(config_dir)
  if root not in sys.path:
    sys.path.insert(0, root)


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Imports `path` and returns its `get_config()`, locked against new keys.

  `path` is a config file or the name of an installed one (see
  `resolve_config_path`), and may end in `:ARG` (ml_collections style): then
  `get_config(ARG)`, e.g. experiments/dcgan.py:cifar10,full or dcgan:cifar10.
  """
  path, arg = split_config_arg(path)
  path = resolve_config_path(path)
  _make_experiments_importable(os.path.dirname(os.path.abspath(path)))
  spec = importlib.util.spec_from_file_location("genimg_experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"Config file {path!r} has no get_config() function.")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ValueError as e:
    raise ConfigError(str(e)) from None
  config.lock()
  return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """All leaf keys of `config` as dotted paths, sorted."""
  keys = []
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(flat_keys(value, f"{prefix}{name}."))
    else:
      keys.append(prefix + name)
  return sorted(keys)


def _parse_value(text: str, old_value):
  """Parses `text` to the type of `old_value` (str fields take text as is)."""
  if isinstance(old_value, str):
    return text
  if isinstance(old_value, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")
  if text.strip().lower() in ("true", "false"):
    # Not a number, although bool is an int subclass (True would be 1).
    raise ValueError(f"expected {type(old_value).__name__}, got the boolean "
                     f"{text!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(old_value, float) and isinstance(value, int):
    value = float(value)
  if isinstance(old_value, tuple) and isinstance(value, (list, int, float, str)):
    value = tuple(value) if isinstance(value, list) else (value,)
  if old_value is not None and not isinstance(value, type(old_value)):
    raise ValueError(
        f"expected {type(old_value).__name__}, got {text!r} "
        f"({type(value).__name__})")
  return value


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies `a.b=value` strings to a copy of `config`.

  Raises ConfigError naming the valid keys when a key does not exist, and the
  expected type when a value does not parse as the field's type.
  """
  config = copy.deepcopy(config)  # Nested fields too; keeps field types.
  valid = flat_keys(config)
  for override in overrides:
    if "=" not in override:
      raise ConfigError(f"Override {override!r} must look like key=value.")
    key, text = override.split("=", 1)
    if key not in valid:
      raise ConfigError(
          f"Unknown config key {key!r}. Valid keys are:\n  " +
          "\n  ".join(valid))
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    try:
      node[leaf] = _parse_value(text, node[leaf])
    except (ValueError, TypeError) as e:
      raise ConfigError(f"Bad value for config key {key!r}: {e}") from None
  config.lock()
  return config


# Fields a resumed run may change: run length, evaluation, logging,
# checkpointing, the device count and where the data lives. Every other field
# defines the experiment (family, model, losses, optimizers, data set, batch,
# seed) and must match the checkpoint's.
RESUMABLE_FIELDS = frozenset({
    "num_steps", "num_epochs", "eval_every", "eval_samples",
    "eval_batch_size", "feature_network", "fid_stats", "log_every", "checkpoint_every",
    "keep_checkpoints", "compilation_cache_dir", "xla_cpu_ynn_fusions",
    "xla_cpu_ynn_fusions_kept",
    "mesh.num_devices", "data.idx_dir",
    "data.tfds_data_dir", "data.download", "data.in_memory",
    "data.eval_split", "vae.iw_samples", "gan.skip_nonfinite",
    "diffusion.sampler", "diffusion.sample_steps", "diffusion.eta",
    "diffusion.guidance_scale", "diffusion.clip_denoised",
})


def _flat_values(config, prefix: str = "") -> dict:
  flat = {}
  for name, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      flat.update(_flat_values(value, f"{prefix}{name}."))
    else:
      flat[prefix + name] = value
  return flat


def model_fingerprint(config: ml_collections.ConfigDict) -> dict:
  """The fields that define the experiment, {dotted key: value}: saved with
  every checkpoint and checked on resume (see `fingerprint_mismatches`)."""
  fingerprint = {k: v for k, v in _flat_values(config).items()
                 if k not in RESUMABLE_FIELDS}
  return json.loads(json.dumps(fingerprint))  # Tuples -> lists, as saved.


def fingerprint_mismatches(saved: dict, current: dict) -> list[str]:
  """"key: saved -> current" for every experiment-defining field that
  differs. Fields only one side has are skipped (fields added by a later
  version); a fingerprint of the older {family, model, image_shape} form is
  read as those fields."""
  if isinstance(saved.get("model"), dict):  # Checkpoints of older versions.
    saved = {"family": saved.get("family"),
             "data.image_shape": saved.get("image_shape"),
             **{f"model.{k}": v for k, v in saved["model"].items()}}
  return [f"{key}: {saved[key]!r} -> {current[key]!r}"
          for key in sorted(saved.keys() & current.keys())
          if saved[key] != current[key]]
