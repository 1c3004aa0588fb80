"""Latent diffusion's autoencoder: diffusers checkpoints -> Flax variables.

`convert_diffusers(INPUT, OUTPUT)` reads a diffusers `AutoencoderKL`
checkpoint the user has downloaded (a directory with `config.json` and
`diffusion_pytorch_model.safetensors` or `.bin`, e.g. stabilityai's
sd-vae-ft-mse, or a pipeline directory with them in `vae/`; or a single
diffusers-format .safetensors file, whose config is read off its shapes)
and writes OUTPUT (msgpack variables of `nets.autoencoder_kl.AutoencoderKL`,
float32) and OUTPUT.json (the network's config, the source's and OUTPUT's
SHA-256). `load(OUTPUT)` checks the SHA-256 and returns (model, variables).
Nothing downloads. Reading .safetensors needs only the `safetensors` package
(numpy); a .bin (a torch pickle) needs torch.

Names map by one rule: a Flax path `encoder/down_blocks_0/resnets_1/conv1/
kernel` is diffusers' `encoder.down_blocks.0.resnets.1.conv1.weight` (an
index after `_` becomes `.index`; kernel and GroupNorm scale are `weight`).
Conv weights [O, I, kh, kw] -> kernels [kh, kw, I, O]; linear weights
[out, in] -> [in, out]. The mid-block attention's projections are read under
either of diffusers' names (`LEGACY_ATTENTION_NAMES`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Mapping

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from genimg_jax import quality
from genimg_jax.nets.autoencoder_kl import AutoencoderKL

NETWORK = "autoencoder_kl"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.fp16.bin")
# The config fields of `AutoencoderKL`, as diffusers names them.
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(AutoencoderKL)
                      if f.name not in ("parent", "name"))
# diffusers' current attention names -> the deprecated AttentionBlock's,
# still found in older checkpoints (diffusers renames them when it loads).
LEGACY_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value",
                          "to_out.0": "proj_attn"}


class ConversionError(ValueError):
  """A checkpoint that does not fit the network; the message is one line."""


def config_from_diffusers(diffusers_config: Mapping) -> dict:
  """diffusers' AutoencoderKL config.json -> `AutoencoderKL`'s fields.
  Refuses what this network does not implement (other block types or
  activations, a spatial-norm decoder)."""
  c = diffusers_config
  name = c.get("_class_name", "AutoencoderKL")
  if name != "AutoencoderKL":
    raise ConversionError(f"config.json is a {name}, not an AutoencoderKL.")
  for key, allowed in (("down_block_types", "DownEncoderBlock2D"),
                       ("up_block_types", "UpDecoderBlock2D")):
    if any(t != allowed for t in c.get(key, [allowed])):
      raise ConversionError(f"config.json {key} {c[key]}: only {allowed} "
                            "blocks are implemented.")
  if c.get("act_fn", "silu") not in ("silu", "swish"):
    raise ConversionError(f"config.json act_fn {c['act_fn']!r}: only silu "
                          "is implemented.")
  config = {k: c[k] for k in CONFIG_FIELDS if k in c}
  if "block_out_channels" in config:
    config["block_out_channels"] = tuple(config["block_out_channels"])
  defaults = {"block_out_channels": (64,), "layers_per_block": 1}  # diffusers'
  for key, value in defaults.items():  # own defaults, where they differ.
    config.setdefault(key, value)
  return config


def config_from_shapes(state_dict: Mapping[str, np.ndarray]) -> dict:
  """The config of a diffusers AutoencoderKL state dict, read off its
  shapes. norm_num_groups and scaling_factor are not in the weights: SD
  1.x/2.x's 32 and 0.18215 (convert a directory with its config.json for
  other values, such as SDXL's scaling_factor 0.13025)."""
  if any(k.startswith(("first_stage_model.", "encoder.down.")) for k in
         state_dict):
    raise ConversionError(
        "These are original (CompVis/LDM) VAE weights, not diffusers': "
        "convert them with diffusers first (AutoencoderKL.from_single_file"
        "(FILE).save_pretrained(DIR)) and pass DIR.")
  if "encoder.conv_in.weight" not in state_dict:
    raise ConversionError("'encoder.conv_in.weight' is missing: not a "
                          "diffusers AutoencoderKL state dict.")
  shape = lambda k: np.shape(state_dict[k])
  levels = 0
  while f"encoder.down_blocks.{levels}.resnets.0.conv1.weight" in state_dict:
    levels += 1
  layers = 0
  while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in state_dict:
    layers += 1
  return {
      "in_channels": shape("encoder.conv_in.weight")[1],
      "out_channels": shape("decoder.conv_out.weight")[0],
      "block_out_channels": tuple(
          shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0]
          for i in range(levels)),
      "layers_per_block": layers,
      "latent_channels": shape("decoder.conv_in.weight")[1],
      "use_quant_conv": "quant_conv.weight" in state_dict,
      "use_post_quant_conv": "post_quant_conv.weight" in state_dict,
      "mid_block_add_attention": any(
          k.startswith("encoder.mid_block.attentions.") for k in state_dict),
  }


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    import safetensors  # pylint: disable=g-import-not-at-top
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Reading .safetensors needs the safetensors package: "
                      "pip install safetensors.") from e
  try:
    return safetensors.numpy.load_file(path)
  except (KeyError, TypeError):  # bfloat16 without ml_dtypes: read it
    # through jax instead.
    with safetensors.safe_open(path, framework="flax") as f:
      return {k: np.asarray(f.get_tensor(k).astype(jnp.float32))
              for k in f.keys()}


def _read_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"Reading {os.path.basename(path)} (a torch pickle) "
                      "needs torch: pip install torch (CPU is enough), or "
                      "convert the .safetensors file.") from e
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in state_dict.items()}


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict, str]:
  """A diffusers AutoencoderKL directory (or pipeline directory with vae/),
  or a single .safetensors file -> (state dict of numpy arrays, config
  fields, the weights file's path)."""
  if os.path.isdir(path):
    if (not os.path.isfile(os.path.join(path, "config.json"))
        and os.path.isfile(os.path.join(path, "vae", "config.json"))):
      path = os.path.join(path, "vae")  # A pipeline: its autoencoder.
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"No config.json in {path!r}: not a diffusers "
                              "AutoencoderKL directory.")
    weights = [os.path.join(path, n) for n in WEIGHT_FILES
               if os.path.isfile(os.path.join(path, n))]
    if not weights:
      raise FileNotFoundError(f"No {' or '.join(WEIGHT_FILES[:2])} in "
                              f"{path!r}.")
    with open(config_path) as f:
      config = config_from_diffusers(json.load(f))
    weights_path = weights[0]
  elif os.path.isfile(path):
    if not path.endswith(".safetensors"):
      raise ValueError(f"{path!r}: a single file must be .safetensors (or "
                       "pass the diffusers directory).")
    weights_path, config = path, None
  else:
    raise FileNotFoundError(
        f"No file or directory {path!r}. Download a diffusers AutoencoderKL "
        "(e.g. stabilityai/sd-vae-ft-mse) and pass its directory.")
  if weights_path.endswith(".safetensors"):
    state_dict = _read_safetensors(weights_path)
  else:
    state_dict = _read_bin(weights_path)
  if config is None:
    config = config_from_shapes(state_dict)
  return state_dict, config, weights_path


def diffusers_name(flax_path: str) -> str:
  """'encoder/down_blocks_0/resnets_1/conv1/kernel' ->
  'encoder.down_blocks.0.resnets.1.conv1.weight'."""
  module, leaf = flax_path.rsplit("/", 1)
  module = re.sub(r"_(\d+)(?=/|$)", r".\1", module).replace("/", ".")
  return f"{module}.{'bias' if leaf == 'bias' else 'weight'}"


def _template(model: AutoencoderKL):
  size = 2 ** len(model.block_out_channels)
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, model.in_channels))))


def params_from_state_dict(template, state_dict: Mapping[str, np.ndarray]
                           ) -> dict:
  """A template of Flax params (arrays or ShapeDtypeStructs, diffusers'
  module names) filled from a diffusers state dict of numpy arrays, float32.
  Every parameter must be found once with its shape, and every tensor used:
  otherwise a ConversionError naming the tensor."""
  flat = flax.traverse_util.flatten_dict(template, sep="/")
  params, used = {}, set()
  for key, spec in flat.items():
    source = diffusers_name(key)
    if source not in state_dict:
      for new, old in LEGACY_ATTENTION_NAMES.items():
        legacy = source.replace(f".{new}.", f".{old}.")
        if legacy != source and legacy in state_dict:
          source = legacy
          break
      else:
        raise ConversionError(f"{source!r} is missing from the checkpoint "
                              f"(needed for {key}, shape {spec.shape}).")
    value = np.asarray(state_dict[source], np.float32)
    if key.endswith("/kernel"):
      if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> HWIO.
      elif value.ndim == 2:
        value = value.T  # [out, in] -> [in, out].
    if value.shape != spec.shape:
      raise ConversionError(
          f"{source!r} has shape {tuple(np.shape(state_dict[source]))}, "
          f"which does not give {key}'s {spec.shape}.")
    params[key] = value
    used.add(source)
  unused = sorted(k for k in state_dict if k not in used)
  if unused:
    raise ConversionError(
        f"The checkpoint has {len(unused)} tensor(s) this network does not "
        f"use, first {unused[0]!r}: a config that does not match them?")
  return flax.traverse_util.unflatten_dict(params, sep="/")


def variables_from_diffusers(state_dict: Mapping[str, np.ndarray],
                             config: Mapping) -> dict:
  """A diffusers AutoencoderKL state dict (numpy arrays) -> variables of
  `AutoencoderKL(**config)` (see `params_from_state_dict`)."""
  template = _template(AutoencoderKL(**config))["params"]
  return {"params": params_from_state_dict(template, state_dict)}


def convert_diffusers(input_path: str, output_path: str) -> dict:
  """A diffusers AutoencoderKL (directory or .safetensors) -> OUTPUT
  (msgpack variables) + OUTPUT.json (config, SHA-256s). Returns the .json's
  contents."""
  state_dict, config, weights_path = read_checkpoint(input_path)
  variables = variables_from_diffusers(state_dict, config)
  return save(AutoencoderKL(**config), variables, output_path,
              source=os.path.basename(weights_path),
              source_sha256=quality.file_sha256(weights_path))


def save(model: AutoencoderKL, variables, output_path: str, **extra) -> dict:
  """Writes OUTPUT (msgpack `variables` of `model`, float32) and OUTPUT.json
  (network, the model's config with its scaling_factor, parameter count,
  SHA-256, and `extra` fields) for `load`. Returns the .json's contents."""
  variables = jax.tree.map(lambda x: np.asarray(x, np.float32),
                           jax.device_get(variables))
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  with open(output_path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(variables))
  full_config = {f: getattr(model, f) for f in CONFIG_FIELDS}
  full_config["block_out_channels"] = list(full_config["block_out_channels"])
  meta = {"network": NETWORK, "config": full_config,
          "num_params": int(sum(np.size(x) for x in
                                jax.tree.leaves(variables))),
          **extra, "sha256": quality.file_sha256(output_path)}
  with open(output_path + ".json", "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def load(path: str) -> tuple[AutoencoderKL, dict]:
  """(model, variables) written by `convert_diffusers`, checked against
  their SHA-256."""
  if not os.path.isfile(path) or not os.path.isfile(path + ".json"):
    raise FileNotFoundError(
        f"Autoencoder weights {path!r} (and its .json) are missing. Convert "
        "a diffusers AutoencoderKL with `genimg convert-autoencoder --input "
        f"DIR --output {path}`.")
  with open(path + ".json") as f:
    meta = json.load(f)
  if meta.get("network") != NETWORK:
    raise ValueError(f"{path!r} is a {meta.get('network')!r}, not an "
                     f"{NETWORK}.")
  if quality.file_sha256(path) != meta["sha256"]:
    raise ValueError(f"{path!r} does not match its SHA-256 {meta['sha256']}: "
                     "the file is corrupt or was changed; convert it again.")
  config = dict(meta["config"])
  config["block_out_channels"] = tuple(config["block_out_channels"])
  with open(path, "rb") as f:
    variables = flax.serialization.msgpack_restore(f.read())
  return AutoencoderKL(**config), variables
