"""Loading experiment configs and applying `--config.a.b=value` overrides.

A config is a Python file in `experiments/` whose `get_config()` returns an
`ml_collections.ConfigDict` (the flax examples' convention). Overrides are typed
by the field they replace, and an unknown key fails at once with the valid keys.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

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
  """`path` if it is a file; for a bare name (no directory, no ".py": "ddpm")
  the installed config of that name; else ConfigError. A path, or a name ending in .py, must exist: a typo in
  /my/configs/dcgan.py must not train the packaged dcgan."""
  if os.path.isfile(path):
    return path
  configs = sorted(f[:-3] for f in os.listdir(packaged_experiments_dir())
                   if f.endswith(".py") and f not in ("__init__.py",
                                                      "common.py"))
  name = os.path.basename(path)
  if os.path.isdir(path):
    raise ConfigError(f"--config {path!r} is a directory, not a config file: "
                      "pass a file with get_config(), e.g. DIR/dcgan.py.")
  if path.endswith(".py") or name != path:
    packaged = name[:-3] if name.endswith(".py") else name
    hint = (f" (the installed config of that name is --config {packaged})"
            if packaged in configs else "")
    raise ConfigError(
        f"Config file {path!r} does not exist{hint}. Pass an existing "
        f"config file, or the bare name of an installed config: one of "
        f"{configs}.")
  packaged = os.path.join(packaged_experiments_dir(), name + ".py")
  if os.path.isfile(packaged):
    return packaged
  raise ConfigError(
      f"No installed config is named {name!r} and no file {path!r} exists. "
      f"Pass a config file, or the name of one of {configs}: for example "
      "--config cnn (or cnn:mnist for another data set).")


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


# --- What every config field may hold -------------------------------------
#
# One table for every family and command: the type and range (or choices) of
# each field, checked by `validate` when a config is loaded and after its
# overrides, before anything compiles or is written. A value with a special
# meaning says so in the rule's note ("0: ...").


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a config field may hold: `kind` (int, float, bool, str or tuple),
  optionally a `low` and a `high` bound (inclusive or not), `choices`,
  a `check(value) -> problem or None` for anything else, and a `note` on
  values with a special meaning."""
  kind: type
  low: float | None = None
  high: float | None = None
  low_inclusive: bool = True
  high_inclusive: bool = True
  choices: tuple = ()
  check: Callable[[Any], str | None] | None = None
  note: str = ""

  def allowed(self) -> str:
    """What the rule allows, in words."""
    if self.choices:
      text = "one of " + ", ".join(repr(c) for c in self.choices)
    elif self.kind is bool:
      text = "true or false"
    elif self.kind in (int, float):
      name = "an integer" if self.kind is int else "a number"
      if self.low is not None and self.high is not None:
        open_ = "[" if self.low_inclusive else "("
        close = "]" if self.high_inclusive else ")"
        text = f"{name} in {open_}{self.low:g}, {self.high:g}{close}"
      elif self.low is not None:
        text = f"{name} {'>=' if self.low_inclusive else '>'} {self.low:g}"
      else:
        text = name
    elif self.kind is tuple:
      text = "a tuple"
    else:
      text = "text"
    return text + (f" ({self.note})" if self.note else "")

  def problem(self, value) -> str | None:
    """None if `value` is allowed, else what is wrong with it."""
    kinds = (int, float) if self.kind is float else (self.kind,)
    if self.kind is tuple:
      kinds = (tuple, list)
    if isinstance(value, bool) and self.kind is not bool or not isinstance(
        value, kinds):
      return f"expected {self.allowed()}"
    if self.choices and value not in self.choices:
      return f"expected {self.allowed()}"
    if self.low is not None and (
        value < self.low or not self.low_inclusive and value == self.low) or (
            self.high is not None and (value > self.high or (
                not self.high_inclusive and value == self.high))):
      return f"expected {self.allowed()}"
    if self.check is not None:
      return self.check(value)
    return None


def _integer(low: float | None = 0, note: str = "") -> Rule:
  return Rule(int, low=low, note=note)


def _number(low: float | None = 0.0, high: float | None = None,
            low_inclusive: bool = True, high_inclusive: bool = True,
            note: str = "") -> Rule:
  return Rule(float, low=low, high=high, low_inclusive=low_inclusive,
              high_inclusive=high_inclusive, note=note)


def _choice(*choices: str) -> Rule:
  return Rule(str, choices=choices)


def _ints_tuple(low: int, length: int | None = None,
                empty_ok: bool = True) -> Callable[[Any], str | None]:
  def check(value):
    if (not all(isinstance(v, int) and not isinstance(v, bool) and v >= low
                for v in value) or (length is not None and len(value) != length)
        or (not empty_ok and not value)):
      size = f"{length} " if length else ("" if empty_ok else "one or more ")
      return f"expected a tuple of {size}integers >= {low}"
    return None
  return check


def _image_shape(value) -> str | None:
  if _ints_tuple(1, 3)(value) or value[2] not in (1, 3):
    return "expected (height, width, channels) with channels 1 or 3"
  return None


def _ynn_fusion_types(value) -> str | None:
  from genimg_jax import parallel  # pylint: disable=g-import-not-at-top
  unknown = sorted({t.strip() for t in value.lower().split(",") if t.strip()}
                   - set(parallel.YNN_FUSION_TYPES))
  if unknown:
    return (f"unknown YNNPACK fusion types {unknown}: a comma-separated "
            f"subset of {list(parallel.YNN_FUSION_TYPES)}, or ''")
  return None


def _data_name(value) -> str | None:
  if not value.strip():
    return "expected a non-empty name"
  for prefix in ("folder:", "arrayrecord:"):
    if value.startswith(prefix) and not value[len(prefix):].strip():
      return f"expected a path after {prefix!r}"
  return None


# Fields that only image files (data.name folder:/arrayrecord:) use.
FILE_SOURCE_FIELDS = ("data.eval_fraction", "data.resize_filter", "data.crop",
                      "data.skip_corrupt")

_BOOL = Rule(bool)
_RATE = _number(0.0, 1.0, high_inclusive=False)  # A probability or decay.
_NONEMPTY = Rule(str, check=lambda v: None if v.strip() else
                 "expected a non-empty name")

# Every optimizer field, as `optimizer.X` (one optimizer) and
# `optimizer.NAME.X` (a GAN's generator and discriminator).
_OPTIMIZER_RULES = {
    "name": _choice("adam", "sgd"),
    "learning_rate": _number(0.0, low_inclusive=False),
    "schedule": _choice("constant", "cosine"),
    "warmup_steps": _integer(0, note="0: no warm-up"),
    "b1": _RATE, "b2": _RATE, "momentum": _RATE,
    "weight_decay": _number(0.0),
    "grad_clip": _number(0.0, note="0: no clipping"),
}

FIELD_RULES: dict[str, Rule] = {
    "family": _choice("classifier", "gan", "vae", "diffusion", "autoencoder"),
    "seed": _integer(0),
    "batch_size": _integer(1, note="the global batch, over all devices"),
    "num_steps": _integer(0, note="0: num_epochs passes instead"),
    "num_epochs": _integer(0, note="used when num_steps is 0"),
    "eval_every": _integer(0, note="0: only at the end"),
    "eval_samples": _integer(0, note="0: no FID or sample scores"),
    "eval_batch_size": _integer(1),
    "eval_reference_split": _choice("train", "test", "eval"),
    "log_every": _integer(1),
    "checkpoint_every": _integer(1),
    "keep_checkpoints": _integer(1),
    "feature_network": Rule(str, note="'': none; a shipped name, a file or "
                            "inception:FILE"),
    "fid_stats": Rule(str, note="'': from the reference split"),
    "compilation_cache_dir": Rule(str, note="'': default; 'off'; a "
                                  "directory"),
    "xla_cpu_ynn_fusions": _BOOL,
    "xla_cpu_ynn_fusions_kept": Rule(str, check=_ynn_fusion_types),
    "augment": _BOOL,
    "augment_flip": _BOOL,
    "mesh.num_devices": _integer(0, note="0: all devices"),
    "mesh.cpu_devices": _integer(0, note="0: as mesh.num_devices; k: k CPU "
                                 "devices where genimg chose the count"),
    "mesh.fsdp": _integer(1, note="1: state replicated; k: split over k "
                          "devices (FSDP)"),
    "data.name": Rule(str, check=_data_name, note="a TFDS name, "
                      "folder:PATH or arrayrecord:PATH"),
    "data.idx_dir": Rule(str, note="'': read data.name through TFDS"),
    "data.tfds_data_dir": Rule(str, note="'': TFDS's default"),
    "data.download": _BOOL,
    "data.in_memory": _BOOL,
    "data.eval_split": _NONEMPTY,
    "data.image_shape": Rule(tuple, check=_image_shape),
    "data.num_classes": _integer(0, note="0: unlabelled"),
    "data.center_crop": _integer(0, note="0: no crop"),
    "data.num_workers": _integer(0, note="0: min(8, CPUs)"),
    "data.random_flip": _BOOL,
    "data.eval_fraction": _number(0.0, 1.0, low_inclusive=False,
                                  high_inclusive=False),
    "data.resize_filter": _choice("bicubic", "area", "lanczos", "bilinear"),
    "data.crop": _choice("center", "random"),
    "data.skip_corrupt": _BOOL,
    "model.name": _choice("cnn", "resnet", "unet", "dit"),
    "model.dtype": _choice("float32", "bfloat16"),
    "model.dropout_rate": _RATE,
    "model.spectral_norm": _BOOL,
    "model.width": _integer(0, note="the ResNet's base width"),
    "model.blocks_per_stage": Rule(tuple, check=_ints_tuple(0,
                                                            empty_ok=False)),
    "model.channels": _integer(1),
    "model.multipliers": Rule(tuple, check=_ints_tuple(1, empty_ok=False)),
    "model.attention_resolutions": Rule(tuple, check=_ints_tuple(1)),
    "model.num_res_blocks": _integer(1),
    "model.patch_size": _integer(1, note="the DiT's patch side"),
    "model.hidden_size": _integer(1, note="the DiT's features per token"),
    "model.depth": _integer(1, note="the DiT's transformer blocks"),
    "model.num_heads": _integer(1),
    "model.mlp_ratio": _number(0.0, low_inclusive=False),
    "model.remat": _choice("none", "blocks", "full"),
    "model.learn_sigma": Rule(bool, note="the DiT also learns the variance "
                              "(eps objective)"),
    "gan.loss": _choice("non_saturating", "hinge", "least_squares",
                        "wgan_gp"),
    "gan.n_critic": _integer(1),
    "gan.gp_weight": _number(0.0),
    "gan.ema_decay": _RATE,
    "gan.ema_warmup": _BOOL,
    "gan.z_dim": _integer(1),
    "gan.conditional": _BOOL,
    "gan.skip_nonfinite": _BOOL,
    "vae.architecture": _choice("mlp", "conv"),
    "vae.beta": _number(0.0),
    "vae.conditional": _BOOL,
    "vae.hidden": _integer(1),
    "vae.iw_samples": _integer(0, note="0: no importance-weighted bound"),
    "vae.latent_dim": _integer(1),
    "vae.likelihood": _choice("bernoulli", "logistic"),
    "autoencoder.block_out_channels": Rule(tuple, check=_ints_tuple(
        1, empty_ok=False), note="one level each; all but the last halve "
        "the side"),
    "autoencoder.layers_per_block": _integer(1),
    "autoencoder.latent_channels": _integer(1),
    "autoencoder.norm_num_groups": _integer(1),
    "autoencoder.mid_block_attention": _BOOL,
    "autoencoder.kl_weight": _number(0.0),
    "autoencoder.loss": _choice("l1", "l2"),
    "autoencoder.disc_weight": _number(0.0, note="0: no discriminator"),
    "autoencoder.disc_start": _integer(0, note="the step the adversarial "
                                       "terms start at"),
    "autoencoder.disc_layers": _integer(1),
    "autoencoder.disc_channels": _integer(1),
    "autoencoder.disc_loss": _choice("hinge", "vanilla"),
    "diffusion.autoencoder": Rule(str, note="'': pixel space; FILE: the "
                                  "KL autoencoder of diffusion.latents"),
    "diffusion.latents": Rule(str, note="'': pixel space; DIR from `genimg "
                              "encode-latents`"),
    "diffusion.objective": _choice("eps", "v", "flow"),
    "diffusion.schedule": _choice("linear", "cosine"),
    "diffusion.num_timesteps": _integer(2),
    "diffusion.conditional": _BOOL,
    "diffusion.label_dropout": _RATE,
    "diffusion.ema_decay": _RATE,
    "diffusion.ema_warmup": _BOOL,
    "diffusion.sampler": _choice("ddpm", "ddim", "euler", "heun"),
    "diffusion.sample_steps": _integer(1),
    "diffusion.eta": _number(0.0),
    "diffusion.guidance_scale": _number(0.0, note="s = 1 + w; 1: none"),
    "diffusion.clip_denoised": _BOOL,
    "diffusion.ddpm_variance": _choice("fixedsmall", "fixedlarge"),
    "diffusion.ddim_spacing": _choice("trailing", "leading", "uniform",
                                      "quadratic"),
    **{f"optimizer.{k}": v for k, v in _OPTIMIZER_RULES.items()},
    **{f"optimizer.*.{k}": v for k, v in _OPTIMIZER_RULES.items()},
}


def rule_for(key: str) -> Rule | None:
  """The rule of dotted `key` (`optimizer.NAME.X` reads `optimizer.*.X`)."""
  if key in FIELD_RULES:
    return FIELD_RULES[key]
  parts = key.split(".")
  if len(parts) == 3 and parts[0] == "optimizer":
    return FIELD_RULES.get(f"optimizer.*.{parts[2]}")
  return None


# The networks of the families that choose one by model.name, and the
# fields each diffusion network reads.
_FAMILY_MODELS = {"classifier": ("cnn", "resnet"),
                  "diffusion": ("unet", "dit")}
_MODEL_FIELDS = {
    "unet": ("channels", "multipliers", "num_res_blocks",
             "attention_resolutions", "dropout_rate"),
    "dit": ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio"),
}


def _dit_problems(flat: dict) -> list[str]:
  """DiT sizes that cannot build: heads, position embedding, patches."""
  problems = []
  hidden, heads, patch = (flat["model.hidden_size"], flat["model.num_heads"],
                          flat["model.patch_size"])
  if hidden % heads:
    problems.append(f"model.hidden_size={hidden}: not divisible by "
                    f"model.num_heads={heads}")
  if hidden % 4:
    problems.append(f"model.hidden_size={hidden}: the 2-D position "
                    "embedding needs a multiple of 4")
  shape = flat.get("data.image_shape")
  if flat.get("diffusion.latents"):  # The latents' shape, once they exist.
    try:
      with open(os.path.join(flat["diffusion.latents"], "latents.json")) as f:
        shape = json.load(f)["latent_shape"]
    except (OSError, ValueError, KeyError):
      shape = None
  if shape and (shape[0] % patch or shape[1] % patch):
    problems.append(f"model.patch_size={patch}: the images "
                    f"({shape[0]} x {shape[1]}) are not divisible into "
                    f"{patch} x {patch} patches")
  return problems


def _autoencoder_problems(flat: dict) -> list[str]:
  """KL autoencoder sizes that cannot build or do not give the image back."""
  problems = []
  channels = tuple(flat["autoencoder.block_out_channels"])
  groups = flat["autoencoder.norm_num_groups"]
  if any(c % groups for c in channels):
    problems.append(f"autoencoder.norm_num_groups={groups}: does not divide "
                    f"every block_out_channels {channels}")
  factor = 2 ** (len(channels) - 1)
  shape = flat.get("data.image_shape")
  if shape and (shape[0] % factor or shape[1] % factor):
    problems.append(f"autoencoder.block_out_channels={channels}: "
                    f"{len(channels) - 1} halvings need image sides "
                    f"divisible by {factor}, not {shape[0]} x {shape[1]}")
  return problems


def _cross_field_problems(flat: dict) -> list[str]:
  """Combinations of valid values that cannot run."""
  problems = []
  get = flat.get
  if get("num_steps") == 0 and get("num_epochs") == 0:
    problems.append("num_steps=0 and num_epochs=0: nothing to train; set "
                    "one of them > 0")
  if get("eval_samples") and not get("feature_network", "x"):
    problems.append(
        f"eval_samples={get('eval_samples')}: an FID needs a feature network;"
        " set feature_network (a shipped name, a file from `genimg "
        "export-features`, or inception:FILE) or eval_samples=0")
  if get("model.name") == "resnet":
    if get("model.width", 1) < 1:
      problems.append(f"model.width={get('model.width')}: the ResNet needs "
                      "a width >= 1")
    if not all(n >= 1 for n in get("model.blocks_per_stage", (1,))):
      problems.append(f"model.blocks_per_stage={get('model.blocks_per_stage')}"
                      ": the ResNet needs >= 1 block in every stage")
  family, name = get("family"), get("model.name")
  if family == "diffusion":
    name = name or "unet"  # Configs without model.name: the UNet.
  if family in _FAMILY_MODELS and "model.name" in flat and (
      name not in _FAMILY_MODELS[family]):
    problems.append(f"model.name={name!r}: the {family} family's networks "
                    f"are {', '.join(map(repr, _FAMILY_MODELS[family]))}")
  elif family == "diffusion":
    missing = [k for k in _MODEL_FIELDS[name] if f"model.{k}" not in flat]
    if missing:
      problems.append(
          f"model.name={name!r}: the config has no model."
          f"{', model.'.join(missing)} (experiments/"
          f"{'dit' if name == 'dit' else 'ddpm'}.py has them)")
    elif name == "dit":
      problems += _dit_problems(flat)
  if get("model.learn_sigma") and name != "dit":
    problems.append(f"model.learn_sigma=True: only the DiT learns the "
                    f"variance, not model.name={name!r}; set "
                    "model.learn_sigma=false or model.name='dit'")
  elif get("model.learn_sigma") and get("diffusion.objective") != "eps":
    problems.append(
        "model.learn_sigma=True: the learned variance (Improved DDPM's "
        "hybrid loss) needs diffusion.objective='eps', not "
        f"{get('diffusion.objective')!r}; set model.learn_sigma=false")
  if family == "autoencoder":
    problems += _autoencoder_problems(flat)
  if family == "diffusion" and bool(get("diffusion.latents")) != bool(
      get("diffusion.autoencoder")):
    problems.append(
        f"diffusion.latents={get('diffusion.latents', '')!r}, diffusion."
        f"autoencoder={get('diffusion.autoencoder', '')!r}: a latent run "
        "needs both (the latents, and the autoencoder that decodes them)")
  if (family == "diffusion" and get("diffusion.latents")
      and get("diffusion.clip_denoised")
      and get("diffusion.objective") != "flow"):
    problems.append("diffusion.clip_denoised=True: latents are not in "
                    "[-1, 1]; set diffusion.clip_denoised=false")
  if get("family") == "diffusion" and "diffusion.sampler" in flat:
    flow = get("diffusion.objective") == "flow"
    allowed = ("euler", "heun") if flow else ("ddpm", "ddim")
    if get("diffusion.sampler") not in allowed:
      problems.append(
          f"diffusion.sampler={get('diffusion.sampler')!r}: the "
          f"{get('diffusion.objective')!r} objective samples with one of "
          f"{', '.join(map(repr, allowed))}")
  return problems


def _ineffective(key: str, flat: dict) -> str | None:
  """Why an overridden `key` would have no effect in `flat`, or None."""
  get = flat.get
  leaf = key.rsplit(".", 1)[-1]
  if key.startswith("optimizer."):
    name = get(key[:-len(leaf)] + "name")
    if leaf == "momentum" and name == "adam":
      return "adam has no momentum (b1 is its first-moment decay)"
    if leaf in ("b1", "b2") and name == "sgd":
      return f"sgd has no {leaf} (momentum is its decay)"
  if key == "gan.gp_weight" and get("gan.loss") != "wgan_gp":
    return f"only gan.loss='wgan_gp' has a gradient penalty"
  if key.startswith("autoencoder.disc_") and key != (
      "autoencoder.disc_weight") and not get("autoencoder.disc_weight"):
    return "the discriminator is off (autoencoder.disc_weight=0)"
  if key in ("fid_stats", "eval_reference_split") and not (
      get("feature_network")) and get(key):
    return "no feature network: set feature_network too"
  if key.startswith("diffusion."):
    sampler = get("diffusion.sampler")
    if key == "diffusion.eta" and sampler != "ddim":
      return f"only the ddim sampler has eta (sampler={sampler!r})"
    if key == "diffusion.sample_steps" and sampler == "ddpm":
      return "the ddpm sampler always takes num_timesteps steps"
    if key == "diffusion.ddpm_variance" and sampler != "ddpm":
      return f"only the ddpm sampler uses it (sampler={sampler!r})"
    if key == "diffusion.ddpm_variance" and get("model.learn_sigma"):
      return "the ddpm sampler takes the learned variance (model.learn_sigma)"
    if key == "diffusion.ddim_spacing" and sampler != "ddim":
      return f"only the ddim sampler uses it (sampler={sampler!r})"
    if key in ("diffusion.guidance_scale", "diffusion.label_dropout") and (
        not get("diffusion.conditional")):
      return "the model is not class-conditional (diffusion.conditional)"
    if key in ("diffusion.schedule", "diffusion.num_timesteps",
               "diffusion.clip_denoised") and get(
                   "diffusion.objective") == "flow":
      return "flow matching has no discrete noise schedule"
  if key in ("model.width", "model.blocks_per_stage") and get(
      "model.name") == "cnn":
    return "only model.name='resnet' has them"
  if key == "augment_flip" and not get("augment"):
    return "augment is off"
  if key in FILE_SOURCE_FIELDS and not str(get("data.name", "")).startswith(
      ("folder:", "arrayrecord:")):
    return "only image files (data.name=folder:PATH or arrayrecord:PATH) use it"
  if key == "data.random_flip" and get("family") == "classifier":
    return "classifiers flip through augment and augment_flip"
  if key == "vae.hidden" and get("vae.architecture") == "conv":
    return "only vae.architecture='mlp' has a hidden layer width"
  return None


def config_problems(config, overridden: Iterable[str] = ()) -> list[str]:
  """Every problem of `config` as one line "FIELD=VALUE: what is allowed":
  fields no rule knows, values outside their rule, combinations that cannot
  run, and `overridden` keys that would have no effect."""
  flat = _flat_values(config)
  problems = []
  for key, value in sorted(flat.items()):
    rule = rule_for(key)
    if rule is None:
      problems.append(f"{key}={value!r}: not a field genimg reads (a typo? "
                      "the fields are listed in genimg_jax/config.py "
                      "FIELD_RULES)")
    elif (problem := rule.problem(value)) is not None:
      problems.append(f"{key}={value!r}: {problem}")
  if not problems:
    problems += _cross_field_problems(flat)
  for key in overridden:
    if key in flat and (why := _ineffective(key, flat)):
      problems.append(f"{key}={flat[key]!r}: has no effect here: {why}")
  return problems


def validate(config, overridden: Iterable[str] = ()) -> None:
  """Raises ConfigError listing every problem of `config` (see
  `config_problems`), one line each."""
  problems = config_problems(config, overridden)
  if len(problems) == 1:
    raise ConfigError(f"bad config value: {problems[0]}")
  if problems:
    raise ConfigError(f"{len(problems)} bad config values:\n  " +
                      "\n  ".join(problems))


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies `a.b=value` strings to a copy of `config`.

  Raises ConfigError naming the valid keys when a key does not exist, the
  expected type when a value does not parse as the field's type, and every
  problem `validate` finds in the result.
  """
  config = copy.deepcopy(config)  # Nested fields too; keeps field types.
  valid = flat_keys(config)
  overridden = []
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
    overridden.append(key)
  config.lock()
  validate(config, overridden)
  return config


# Fields a resumed run may change: run length, evaluation, logging,
# checkpointing, the device count, rematerialisation (the same math) and
# where the data lives. Every other field
# defines the experiment (family, model, losses, optimizers, data set, batch,
# seed) and must match the checkpoint's.
RESUMABLE_FIELDS = frozenset({
    "num_steps", "num_epochs", "eval_every", "eval_samples",
    "eval_batch_size", "feature_network", "fid_stats", "eval_reference_split",
    "log_every", "checkpoint_every",
    "keep_checkpoints", "compilation_cache_dir", "xla_cpu_ynn_fusions",
    "xla_cpu_ynn_fusions_kept",
    "mesh.num_devices", "mesh.cpu_devices", "mesh.fsdp", "data.idx_dir",
    "data.tfds_data_dir", "data.download", "data.in_memory", "data.num_workers",
    "data.eval_split", "data.skip_corrupt", "vae.iw_samples",
    "gan.skip_nonfinite", "model.remat", "diffusion.sampler", "diffusion.sample_steps", "diffusion.eta",
    "diffusion.guidance_scale", "diffusion.clip_denoised",
    "diffusion.ddpm_variance", "diffusion.ddim_spacing",
})


# The fields that decide what an FID measures: FIDs computed under different
# values of these are not comparable (the best checkpoint restarts when one
# changes).
EVALUATION_PROTOCOL_FIELDS = (
    "feature_network", "fid_stats", "eval_samples", "eval_reference_split",
    "data.eval_split", "diffusion.sampler", "diffusion.sample_steps",
    "diffusion.eta", "diffusion.guidance_scale", "diffusion.clip_denoised",
    "diffusion.ddpm_variance", "diffusion.ddim_spacing")


def evaluation_protocol(config) -> dict:
  """{field: value} of the `EVALUATION_PROTOCOL_FIELDS` that `config` has."""
  flat = _flat_values(config)
  return json.loads(json.dumps({k: flat[k] for k in
                                EVALUATION_PROTOCOL_FIELDS if k in flat}))


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
