"""PNG sample grids and latent interpolations."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images: np.ndarray, low: float = -1.0,
             high: float = 1.0) -> np.ndarray:
  """Float images in [low, high] -> uint8 [0, 255] (clipped, rounded half
  to even). numpy in, numpy out; a jax.Array stays on its devices (the same
  float32 operations, so the same bytes)."""
  xp = jnp if isinstance(images, jax.Array) else np
  scaled = (xp.asarray(images, xp.float32) - low) / (high - low)
  return xp.clip(xp.round(scaled * 255.0), 0, 255).astype(xp.uint8)


def grid(images_NHWC: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [rows*(H+pad)+pad, ..., C]."""
  n, h, w, c = images_NHWC.shape
  rows = -(-n // columns)
  canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255,
                   np.uint8)
  for i, image in enumerate(images_NHWC):
    r, col = divmod(i, columns)
    canvas[pad + r * (h + pad):pad + r * (h + pad) + h,
           pad + col * (w + pad):pad + col * (w + pad) + w] = image
  return canvas


def save_grid(path: str, images_NHWC: np.ndarray, columns: int,
              scale: int = 2) -> str:
  """Writes uint8 images [N, H, W, C] as one PNG grid, upscaled `scale`x."""
  canvas = grid(np.asarray(images_NHWC), columns)
  if canvas.shape[-1] == 1:
    canvas = canvas[..., 0]
  image = Image.fromarray(canvas)
  if scale > 1:
    image = image.resize((image.width * scale, image.height * scale),
                         Image.NEAREST)
  path = epath.Path(path)  # A local path or a URL (gs://...).
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    image.save(f, format="PNG")
  return os.fspath(path)


def save_grids(sample_dir: str, grids: dict, step: int) -> None:
  """Writes {name: (uint8 images, columns)} as sample_dir/name_STEP.png, on
  process 0 only (every process computed the images)."""
  if jax.process_index() != 0:
    return
  for name, (images, columns) in grids.items():
    save_grid(os.path.join(sample_dir, f"{name}_{step:06d}.png"), images,
              columns)


def read_grids(sample_dir: str, step: int) -> dict:
  """{name: uint8 [H, W, C]} of the grids `save_grids` wrote at `step`."""
  suffix = f"_{step:06d}.png"
  sample_dir = epath.Path(sample_dir)
  if not sample_dir.is_dir():
    return {}
  grids = {}
  for path in sorted(sample_dir.iterdir()):
    if path.name.endswith(suffix):
      with path.open("rb") as f:
        image = np.asarray(Image.open(f))
      grids[path.name[:-len(suffix)]] = (image[..., None] if image.ndim == 2
                                         else image)
  return grids


def slerp(z0: jax.Array, z1: jax.Array, num: int) -> jax.Array:
  """Spherical interpolation between latents z0, z1 [Z] -> [num, Z]."""
  t = jnp.linspace(0.0, 1.0, num)[:, None]
  cos = jnp.dot(z0, z1) / (jnp.linalg.norm(z0) * jnp.linalg.norm(z1))
  omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  sin = jnp.sin(omega)
  linear = (1 - t) * z0 + t * z1
  spherical = (jnp.sin((1 - t) * omega) * z0 + jnp.sin(t * omega) * z1) / sin
  return jnp.where(sin < 1e-6, linear, spherical)


def interpolation_latents(rng: jax.Array, rows: int, columns: int,
                          z_dim: int) -> jax.Array:
  """[rows * columns, Z]: each row slerps between two random latents.

  rng: draws the 2 * rows end points.
  """
  ends = jax.random.normal(rng, (rows, 2, z_dim))
  return jnp.concatenate([slerp(e[0], e[1], columns) for e in ends])
