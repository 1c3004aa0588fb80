"""bfloat16 compute with float32 parameters follows the float32 loss curve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genimg_jax import bench, parallel, train


def _losses(model, dtype, steps=6):
  config = bench.load_model_config(model, 16, dtype, 0)
  mesh = parallel.make_mesh()
  state = train.init_state(config, mesh, jax.random.key(0), 100)
  step = train.compile_train_step(config, mesh)
  batch = bench.synthetic_batch(config, mesh)
  rng = parallel.replicate(jax.random.key(1), mesh)
  key = {"cnn": "loss", "resnet": "loss", "dcgan": "d_loss"}.get(model, "loss")
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch, rng)
    losses.append(float(metrics[key]))
  return np.array(losses), state


@pytest.mark.parametrize("model", ["cnn", "dcgan", "vae"])
def test_bfloat16_loss_curve_matches_float32(model):
  f32, _ = _losses(model, "float32")
  bf16, state = _losses(model, "bfloat16")
  params = state.g.params if model == "dcgan" else state.params
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  np.testing.assert_allclose(bf16, f32, rtol=0.05)
  assert not np.array_equal(bf16, f32)  # bfloat16 really was used.
