"""Latent data for latent diffusion: encoding a data set with a KL
autoencoder (`genimg encode-latents`), reading it back, drawing latents.

`encode_latents(config, AUTOENCODER, DIR)` encodes the train split and
config.data.eval_split of the config's data set with `autoencoder.load`'s
network and writes DIR/SPLIT.npz ("mean" and "logvar" float32 [N, h, w, c]
of q(z|x), "label" int32 [N]; with data.random_flip, the train split also
holds "flip_mean" and "flip_logvar" of the mirrored images) and
DIR/latents.json (the autoencoder's file name and SHA-256, its scaling and
shift factors, the latent and image shapes, the split sizes).

A diffusion run with config.diffusion.latents = DIR trains on
z = scaling_factor * (mean + exp(logvar / 2) eps - shift_factor), eps drawn
in the train step (`draw_latents`): a fresh posterior sample each time an
image is used, as LDM's first stage gives it. Its sources (`load_split`)
hold the moments as float32 "image" [N, h, w, 2c] (mean, then logvar on the
channel axis; 4c with the flips' moments after them).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from genimg_jax import autoencoder, data, parallel

LATENTS_JSON = "latents.json"
# The posterior draws of a train step come from fold_in(step rng,
# LATENT_STREAM) ("latn" in ASCII), apart from its other draws.
LATENT_STREAM = 0x6C61746E


def is_latent(config) -> bool:
  """Whether `config` trains a diffusion model on latents."""
  return config.family == "diffusion" and bool(
      config.diffusion.get("latents", ""))


def _read_json(path: str) -> dict:
  return _read_json_version(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_json_version(path: str, mtime_ns: int) -> dict:
  del mtime_ns  # Part of the cache key: a rewritten file is read again.
  with open(path) as f:
    return json.load(f)


def info(config) -> dict:
  """The latents.json of config.diffusion.latents, checked against
  config.diffusion.autoencoder (the same network, by SHA-256) and the data
  (image shape)."""
  directory = config.diffusion.latents
  path = os.path.join(directory, LATENTS_JSON)
  if not os.path.isfile(path):
    raise data.DataError(
        f"{path!r} is missing: write the latents first with `genimg "
        f"encode-latents --config CONFIG --autoencoder "
        f"{config.diffusion.autoencoder or 'FILE'} --output {directory}`.")
  meta = _read_json(path)
  ae_json = config.diffusion.autoencoder + ".json"
  if not os.path.isfile(ae_json):
    raise FileNotFoundError(
        f"Autoencoder {config.diffusion.autoencoder!r} (and its .json) is "
        "missing: it decodes the samples (config.diffusion.autoencoder).")
  sha = _read_json(ae_json)["sha256"]
  if sha != meta["autoencoder_sha256"]:
    raise data.DataError(
        f"The latents in {directory!r} were encoded by "
        f"{meta['autoencoder']!r} (SHA-256 {meta['autoencoder_sha256'][:12]}"
        f"...), not by config.diffusion.autoencoder "
        f"{config.diffusion.autoencoder!r} ({sha[:12]}...): encode them "
        "again with this autoencoder.")
  if tuple(meta["image_shape"]) != tuple(config.data.image_shape):
    raise data.DataError(
        f"The latents in {directory!r} encode {tuple(meta['image_shape'])} "
        f"images, not config.data.image_shape {tuple(config.data.image_shape)}.")
  return meta


def latent_shape(config) -> tuple[int, int, int]:
  """(h, w, c) of the latents the network sees."""
  return tuple(info(config)["latent_shape"])


@functools.lru_cache(maxsize=2)
def _load_autoencoder(path: str):
  return autoencoder.load(path)


def load_autoencoder(config):
  """(model, variables) of config.diffusion.autoencoder, read once."""
  info(config)  # The latents and the autoencoder belong together.
  return _load_autoencoder(config.diffusion.autoencoder)


def load_split(config, split: str) -> data.ArraySource:
  """DIR/SPLIT.npz as a source whose "image" is float32 moments
  [N, h, w, 2c] (mean, logvar; the train split with data.random_flip: 4c,
  flip_mean and flip_logvar after them)."""
  meta = info(config)
  path = os.path.join(config.diffusion.latents, f"{split}.npz")
  if not os.path.isfile(path):
    raise data.DataError(f"{path!r} is missing: `genimg encode-latents` "
                         "writes the train split and data.eval_split.")
  flip = config.data.get("random_flip", False) and split == "train"
  with np.load(path) as f:
    if flip and "flip_mean" not in f:
      raise data.DataError(
          f"{path!r} holds no moments of mirrored images, which "
          "data.random_flip needs: encode the latents with random_flip on.")
    parts = [f["mean"], f["logvar"]]
    if flip:
      parts += [f["flip_mean"], f["flip_logvar"]]
    moments = np.concatenate([np.asarray(p, np.float32) for p in parts], -1)
    labels = np.asarray(f["label"], np.int32)
  if moments.shape[1:3] != tuple(meta["latent_shape"][:2]):
    raise data.DataError(f"{path!r} holds {moments.shape[1:3]} latents, not "
                         f"latents.json's {meta['latent_shape']}.")
  return data.ArraySource(moments, labels)


def draw_latents(moments_BHWK, rng, scaling_factor: float,
                 shift_factor: float = 0.0, flip: bool = False):
  """z = scaling_factor * (mean + exp(logvar / 2) eps - shift_factor) [B, h,
  w, c] from moments [B, h, w, 2c] (mean, logvar). rng (the train step's,
  folded with the step): eps from fold_in(rng, LATENT_STREAM). flip: the
  moments are [B, h, w, 4c], the image's then the mirrored image's, and each
  row takes the mirrored one where `data.random_flip`'s draw from the same
  rng would mirror the image."""
  if flip:
    plain, flipped = jnp.split(moments_BHWK, 2, axis=-1)
    flips_B = jax.random.bernoulli(
        jax.random.fold_in(rng, data.FLIP_STREAM), 0.5, plain.shape[:1])
    moments_BHWK = jnp.where(flips_B[:, None, None, None], flipped, plain)
  mean, logvar = jnp.split(moments_BHWK, 2, axis=-1)
  eps = jax.random.normal(jax.random.fold_in(rng, LATENT_STREAM), mean.shape)
  return scaling_factor * (mean + jnp.exp(0.5 * logvar) * eps - shift_factor)


def _replicated_variables(variables, mesh):
  """Host arrays (the same on every process) -> replicated global arrays."""
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda index: np.asarray(x)[index]), variables)


def make_decoder(model, variables, mesh, scaling_factor: float,
                 shift_factor: float = 0.0):
  """(jitted decode(variables, z [b, h, w, c]) -> images in [-1, 1]
  [b, H, W, C], the variables replicated on `mesh`): the autoencoder's
  decoder of z / scaling_factor + shift_factor, clipped."""
  def decode(v, z):
    x = model.apply(v, z / scaling_factor + shift_factor, method="decode")
    return jnp.clip(x, -1.0, 1.0)
  return decode, _replicated_variables(variables, mesh)


def encode_latents(config, autoencoder_path: str, output: str) -> dict:
  """Encodes the train split and config.data.eval_split (module docstring).
  Batches of config.eval_batch_size as `data.eval_batches` makes them,
  sharded over config.mesh.num_devices devices; every process computes,
  process 0 writes. Returns latents.json's contents."""
  model, variables = autoencoder.load(autoencoder_path)
  shape = tuple(config.data.image_shape)
  if model.in_channels != shape[2]:
    raise data.DataError(
        f"{autoencoder_path!r} encodes {model.in_channels}-channel images, "
        f"but {config.data.name!r} has {shape[2]} (data.image_shape).")
  mesh = parallel.make_mesh(config.mesh.num_devices)
  repl, batch_sharding = (parallel.replicated(mesh),
                          parallel.data_sharding(mesh))
  variables = _replicated_variables(variables, mesh)

  @functools.partial(jax.jit, in_shardings=(repl, batch_sharding),
                     out_shardings=batch_sharding)
  def encode(v, images_uint8):
    x = images_uint8.astype(jnp.float32) / 127.5 - 1.0
    moments = list(model.apply(v, x, method="encode"))
    if config.data.get("random_flip", False):
      moments += model.apply(v, x[:, :, ::-1], method="encode")
    return tuple(moments)

  flips = bool(config.data.get("random_flip", False))
  names = ["mean", "logvar"] + (["flip_mean", "flip_logvar"] if flips else [])
  splits = {}
  if jax.process_index() == 0:
    os.makedirs(output, exist_ok=True)
  for split in ("train", config.data.eval_split):
    source = data.load_split(config.data, split)
    parts = {name: [] for name in names + ["label"]}
    for batch in data.eval_batches(source, config.eval_batch_size, mesh):
      keep = parallel.to_host(batch["mask"]) > 0
      outputs = encode(variables, batch["image"])
      for name, value in zip(names, outputs):
        parts[name].append(parallel.to_host(value)[keep])
      parts["label"].append(parallel.to_host(batch["label"])[keep])
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    arrays["label"] = arrays["label"].astype(np.int32)
    if split == config.data.eval_split and flips:
      arrays = {k: arrays[k] for k in ("mean", "logvar", "label")}
    if jax.process_index() == 0:
      np.savez(os.path.join(output, f"{split}.npz"), **arrays)
    splits[split] = len(arrays["label"])
    latent = list(arrays["mean"].shape[1:])
  meta = {"autoencoder": os.path.basename(autoencoder_path),
          "autoencoder_sha256": _read_json(autoencoder_path + ".json")[
              "sha256"],
          "scaling_factor": float(model.scaling_factor),
          "shift_factor": float(model.shift_factor or 0.0),
          "latent_shape": latent, "image_shape": list(shape),
          "data": config.data.name, "splits": splits, "flips": flips}
  if jax.process_index() == 0:
    with open(os.path.join(output, LATENTS_JSON), "w") as f:
      json.dump(meta, f, indent=2)
  return meta
