"""FSDP: the train state split over a "fsdp" mesh axis (config.mesh.fsdp)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from genimg_jax import parallel, train
from conftest import assert_metrics_agree, assert_runs_agree
from conftest import assert_trees_near, params_of
from conftest import tiny_config, train_runs


def test_each_leaf_is_split_along_its_largest_divisible_dimension():
  mesh = parallel.make_mesh(8, fsdp=4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  tree = {"kernel": jax.ShapeDtypeStruct((3, 3, 16, 64), jnp.float32),
          "bias": jax.ShapeDtypeStruct((64,), jnp.float32),
          "odd": jax.ShapeDtypeStruct((6, 10), jnp.float32),
          "tie": jax.ShapeDtypeStruct((8, 8), jnp.float32),
          "count": jax.ShapeDtypeStruct((), jnp.int32)}
  specs = jax.tree.map(lambda s: s.spec, parallel.state_sharding(mesh, tree))
  assert specs == {"kernel": P(None, None, None, "fsdp"), "bias": P("fsdp"),
                   "odd": P(), "tie": P("fsdp", None), "count": P()}
  # Without the axis everything is replicated, and batches go over all
  # devices either way.
  one_axis = parallel.make_mesh(8)
  assert all(s.spec == P() for s in jax.tree.leaves(
      parallel.state_sharding(one_axis, tree)))
  assert parallel.data_sharding(mesh).spec == P(("data", "fsdp"))
  with pytest.raises(ValueError, match="does not divide"):
    parallel.make_mesh(8, fsdp=3)


def test_fsdp_trains_like_data_parallel_and_one_device(tmp_path, idx_dir):
  """data=8, data=2 x fsdp=4 and 1 device: the same losses and parameters
  (the tolerances of the 1-vs-8-device test), the state really split; a
  checkpoint of the FSDP run resumes on a plain data-parallel mesh."""
  runs = train_runs(tmp_path, {
      name: tiny_config(idx_dir, "cnn.py", **mesh) for name, mesh in {
          "d8": {}, "fsdp4": {"mesh.fsdp": 4},
          "d1": {"mesh.num_devices": 1}}.items()})
  kernel = runs["fsdp4"].state.params["Dense_0"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", None) or "fsdp" in str(
      kernel.sharding.spec)
  assert kernel.addressable_shards[0].data.size == kernel.size // 4
  for other in ("d8", "d1"):
    assert_runs_agree(runs[other], runs["fsdp4"],
                      ("loss", "grad_norm", "param_norm"), rtol=5e-6,
                      params_rtol=2e-5)
  # Stopped at step 3 with fsdp=4, resumed to 6 with fsdp=1.
  workdir = str(tmp_path / "switch")
  train.train_and_evaluate(tiny_config(idx_dir, "cnn.py", **{"mesh.fsdp": 4}),
                           workdir, stop_at_step=3)
  resumed, _ = train.train_and_evaluate(tiny_config(idx_dir, "cnn.py"),
                                        workdir)
  assert int(resumed.step) == 6
  assert_trees_near(params_of(runs["d8"].state), params_of(resumed), 2e-5)


# Every family on data=8 and on data=2 x fsdp=4 (the classifier above):
# tiny widths, 4 steps.
FAMILY_CONFIGS = {
    "dcgan.py": {},
    "vae_conv.py": {},
    "ddpm.py": {"model.channels": 8, "model.multipliers": "(1,)",
                "model.num_res_blocks": 1, "model.attention_resolutions": "()",
                "diffusion.sample_steps": 2},
    "dit.py": {"model.hidden_size": 16, "model.depth": 1,
               "model.num_heads": 2, "model.patch_size": 4,
               "diffusion.sample_steps": 2},
    # SGD: Adam would turn the rounding noise of leaves whose gradient is 0
    # in exact arithmetic (attention key biases, biases before GroupNorm)
    # into full-size steps of either sign.
    "autoencoder_kl.py": {"autoencoder.block_out_channels": "(8, 16)",
                          "autoencoder.norm_num_groups": 4,
                          "autoencoder.latent_channels": 2,
                          "optimizer.name": "sgd", "optimizer.momentum": 0.9},
}


def _state_arrays(state):
  """Every array of a train state (parameters, EMA, optimizer state, batch
  statistics; both networks' for the GAN) on the host, by path."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)),
                      jax.tree.map(lambda x: x, state))


@pytest.mark.parametrize("experiment", sorted(FAMILY_CONFIGS))
def test_every_family_trains_alike_with_its_state_split(tmp_path, idx_dir,
                                                       experiment):
  """GAN, VAE, diffusion (UNet, DiT) and autoencoder: with mesh.fsdp=4 the
  same logged metrics each step and the same state (every array, the
  optimizer's too) as data parallel on 8 devices, and some of the state
  really split over "fsdp"."""
  overrides = {**FAMILY_CONFIGS[experiment], "num_steps": 4, "log_every": 1}
  runs = train_runs(tmp_path, {
      name: tiny_config(idx_dir, experiment, **overrides, **mesh)
      for name, mesh in {"d8": {}, "fsdp4": {"mesh.fsdp": 4}}.items()})
  split = [x for x in jax.tree.leaves(runs["fsdp4"].state)
           if isinstance(x, jax.Array) and "fsdp" in str(x.sharding.spec)]
  assert split, "no array of the state is split over fsdp"
  # The GAN's two-player steps amplify rounding: tests/test_gan.py's 1 vs 8
  # device tolerance.
  rtol, atol = (1e-2, 1e-5) if experiment == "dcgan.py" else (1e-4, 1e-6)
  names = [k for k in runs["d8"].metrics if not k.startswith("speed")]
  assert_metrics_agree(runs["d8"].metrics, runs["fsdp4"].metrics, rtol, names,
                       atol=1e-6)
  assert_trees_near(_state_arrays(runs["d8"].state),
                    _state_arrays(runs["fsdp4"].state), rtol, floor=1e-4,
                    atol=atol)
