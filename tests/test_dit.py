"""The DiT network (genimg_jax/nets/dit.py): DiT-XL/2's parameter count and
forward multiply-adds against the paper, adaLN-Zero (zero output, identity
blocks at initialisation), the position embedding against the official
numpy code, shapes, bfloat16 with float32 attention logits, and the
diffusion family's step with model.name "dit" on 1 and 8 devices."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genimg_jax import config as config_lib, diffusion, parallel, train
from genimg_jax.nets import dit
from conftest import REPO, assert_metrics_agree, assert_trees_near
from conftest import steps_on_mesh, tiny_config

# A DiT that compiles in seconds: 4 x 4 tokens of 16 features on 8 x 8.
TINY = dict(patch_size=2, hidden_size=16, depth=2, num_heads=2)
# experiments/dit.py shrunk the same way for the family's step.
TINY_CONFIG = {"model.hidden_size": 16, "model.depth": 1,
               "model.num_heads": 2, "model.patch_size": 4,
               "diffusion.sample_steps": 2}


def _num_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _init(model, x, num_classes=0, seed=1):
  labels = jnp.zeros((x.shape[0],), jnp.int32) if num_classes else None
  return jax.jit(model.init)(jax.random.key(seed), x, jnp.zeros((x.shape[0],)),
                             labels)


# --- The official position embedding (facebookresearch/DiT models.py, from
# MAE's util/pos_embed.py), transcribed unchanged but for names. ------------

def official_get_2d_sincos_pos_embed(embed_dim, grid_size):
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.meshgrid(grid_w, grid_h)  # here w goes first
  grid = np.stack(grid, axis=0)
  grid = grid.reshape([2, 1, grid_size, grid_size])
  return official_get_2d_sincos_pos_embed_from_grid(embed_dim, grid)


def official_get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
  assert embed_dim % 2 == 0
  emb_h = official_get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
  emb_w = official_get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
  return np.concatenate([emb_h, emb_w], axis=1)


def official_get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
  assert embed_dim % 2 == 0
  omega = np.arange(embed_dim // 2, dtype=np.float64)
  omega /= embed_dim / 2.
  omega = 1. / 10000**omega
  pos = pos.reshape(-1)
  out = np.einsum("m,d->md", pos, omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@pytest.mark.parametrize("grid_size,dim", [(4, 16), (7, 64), (16, 1152)])
def test_position_embedding_is_the_official_one(grid_size, dim):
  want = official_get_2d_sincos_pos_embed(dim, grid_size).astype(np.float32)
  got = dit.sincos_position_embedding(grid_size, grid_size, dim)
  assert got.shape == (grid_size * grid_size, dim) and got.dtype == np.float32
  np.testing.assert_array_equal(got, want)


def test_the_network_adds_the_position_embedding_to_its_tokens():
  """At initialisation every block is the identity (adaLN-Zero), so the
  last block's output is patch embedding + position embedding: the
  embedding the network adds, in its token order, is the official one."""
  model = dit.DiT(**TINY)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = _init(model, x)
  _, state = model.apply(variables, x, jnp.array([3.0, 700.0]),
                         capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]
  patches = inter["x_embedder"]["__call__"][0].reshape(2, 16, 16)
  tokens = inter[f"blocks_{TINY['depth'] - 1}"]["__call__"][0]
  np.testing.assert_allclose(
      tokens - patches, np.broadcast_to(
          official_get_2d_sincos_pos_embed(16, 4), (2, 16, 16)), atol=1e-6)


# --- Size and cost ----------------------------------------------------------

def test_dit_xl2_parameter_count():
  """DiT-XL/2 on 32 x 32 x 4 latents, 1000 classes, learn_sigma: the
  official 675,129,632 counts its frozen position embedding (256 tokens x
  1152) as parameters; here it is a constant."""
  model = dit.DiT(**dit.dit_config("DiT-XL/2"), num_classes=1000,
                  learn_sigma=True)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)),
      jnp.zeros((1,), jnp.int32)))
  assert _num_params(shapes) == 674_834_720
  assert _num_params(shapes) + 256 * 1152 == 675_129_632
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  assert shapes["params"]["y_embedder"]["embedding"].shape == (1001, 1152)


def test_sizes_and_config_names():
  assert dit.dit_config("DiT-S/8") == {"hidden_size": 384, "depth": 12,
                                       "num_heads": 6, "patch_size": 8,
                                       "mlp_ratio": 4.0}
  assert dit.dit_config("DiT-XL/2")["depth"] == 28
  for bad in ("DiT-XL/3", "DiT-M/2", "XL/2"):
    with pytest.raises(ValueError, match="DiT-XL/2"):
      dit.dit_config(bad)
  # experiments/dit.py:cifar10,full is DiT-B/2.
  config = config_lib.load_config_file(
      os.path.join(REPO, "experiments", "dit.py:cifar10,full"))
  model = diffusion.make_model(config, 0)
  assert isinstance(model, dit.DiT)
  b2 = dit.dit_config("DiT-B/2")
  assert {k: getattr(model, k) for k in b2} == b2


def test_forward_flops_are_the_papers_and_half_of_xlas():
  """The paper's Gflops (Table 4: S/2 6.06, B/2 23.01, XL/2 118.6 at 256 x
  256, i.e. 32 x 32 x 4 latents) are multiply-adds; XLA's cost analysis of
  the lowered (not compiled) DiT-XL/2 counts 2 flops per multiply-add, and
  about 0.3% more for the elementwise work."""
  flops = lambda name: dit.dit_forward_flops(
      32, 32, 4, learn_sigma=True, **{k: v for k, v in dit.dit_config(
          name).items() if k != "num_heads"})
  assert flops("DiT-XL/2") / 1e9 == pytest.approx(118.6, abs=0.05)
  assert flops("DiT-B/2") / 1e9 == pytest.approx(23.01, abs=0.01)
  assert flops("DiT-S/2") / 1e9 == pytest.approx(6.06, abs=0.01)

  model = dit.DiT(**dit.dit_config("DiT-XL/2"), num_classes=1000,
                  learn_sigma=True)
  args = (jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.int32))
  variables = jax.eval_shape(model.init, jax.random.key(0), *args)
  cost = jax.jit(model.apply).lower(variables, *args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert cost["flops"] / (2 * flops("DiT-XL/2")) == pytest.approx(1.0,
                                                                   abs=0.01)


# --- adaLN-Zero ---------------------------------------------------------------

def test_zero_output_at_init_and_not_after_perturbing_the_final_layer():
  model = dit.DiT(**TINY, num_classes=10)
  x = 3.0 * jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  time, labels = jnp.array([5.0, 900.0]), jnp.array([4, 10])
  variables = _init(model, x, num_classes=10)
  out = jax.jit(model.apply)(variables, x, time, labels)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)

  params = variables["params"]
  for i in range(TINY["depth"]):  # adaLN-Zero: every block's modulation.
    for leaf in jax.tree.leaves(params[f"blocks_{i}"]["adaLN_modulation"]):
      np.testing.assert_array_equal(leaf, 0.0)
  final = params["final_layer"]
  keys = iter(jax.random.split(jax.random.key(2), 8))
  perturbed = {**params, "final_layer": jax.tree.map(
      lambda p: 0.1 * jax.random.normal(next(keys), p.shape), final)}
  out = jax.jit(model.apply)({"params": perturbed}, x, time, labels)
  assert float(jnp.min(jnp.std(out, axis=(1, 2, 3)))) > 1e-2


# --- Shapes and labels --------------------------------------------------------

@pytest.mark.parametrize("patch_size,num_classes,learn_sigma,hw", [
    (2, 0, False, (8, 8)), (2, 10, True, (8, 8)), (4, 10, False, (8, 12)),
    (4, 0, True, (8, 8))])
def test_output_shapes(patch_size, num_classes, learn_sigma, hw):
  model = dit.DiT(**{**TINY, "patch_size": patch_size},
                  num_classes=num_classes, learn_sigma=learn_sigma)
  x = jax.random.normal(jax.random.key(0), (3, *hw, 3))
  variables = _init(model, x, num_classes)
  # labels == num_classes: the null class of classifier-free guidance.
  labels = jnp.array([0, 9, 10]) if num_classes else None
  out = jax.jit(model.apply)(variables, x, jnp.array([0.0, 1.0, 999.0]),
                             labels)
  assert out.shape == (3, *hw, 6 if learn_sigma else 3)
  assert out.dtype == jnp.float32
  if num_classes:
    assert variables["params"]["y_embedder"]["embedding"].shape == (
        num_classes + 1, 16)
  else:
    assert "y_embedder" not in variables["params"]


def test_labels_condition_the_output_and_are_required():
  model = dit.DiT(**TINY, num_classes=10)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = _init(model, x, 10)
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  variables = jax.tree.unflatten(tree, [  # Non-zero outputs.
      p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  time = jnp.array([10.0, 10.0])
  apply = jax.jit(model.apply)
  null, labelled = (apply(variables, x, time, jnp.array([l, l]))
                    for l in (10, 3))
  assert float(jnp.max(jnp.abs(null - labelled))) > 1e-2
  with pytest.raises(ValueError, match="needs labels"):
    model.apply(variables, x, time, None)
  with pytest.raises(ValueError, match="not divisible into patches"):
    model.apply(variables, x[:, :7], time, jnp.array([1, 2]))


def test_timestep_embedding_is_glides():
  emb = dit.timestep_embedding(jnp.array([0.0, 10.0]), 8)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)
  freqs = np.exp(-math.log(10000) * np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate(
      [np.cos(10 * freqs), np.sin(10 * freqs)]), rtol=1e-5, atol=1e-6)


# --- bfloat16 -------------------------------------------------------------------

def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside it."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else (param,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _equations(sub)


def _attention_ops(fn, *args, num_tokens):
  """(dtypes of the q k^T matmuls' outputs, dtypes of exp's inputs) in
  fn(*args)'s jaxpr: the matmuls with a [.., T, .., T] output."""
  logits, exps = [], []
  for eqn in _equations(jax.make_jaxpr(fn)(*args).jaxpr):
    if eqn.primitive.name == "dot_general":
      shape = eqn.outvars[0].aval.shape
      if shape.count(num_tokens) >= 2:
        logits.append(eqn.outvars[0].aval.dtype)
    if eqn.primitive.name == "exp":
      exps.append(eqn.invars[0].aval.dtype)
  return logits, exps


def test_bfloat16_attention_logits_and_softmax_are_float32():
  q = jax.random.normal(jax.random.key(0), (2, 16, 4, 8), jnp.bfloat16)
  logits, exps = _attention_ops(dit.attention, q, q, q, num_tokens=16)
  assert logits == [jnp.float32] and exps == [jnp.float32]
  assert dit.attention(q, q, q).dtype == jnp.bfloat16

  # The whole network in bfloat16: parameters float32, every attention's
  # logits and every exp (softmax, time embedding) float32. 16 tokens of 24
  # features: only the logits have two axes of 16.
  sizes = {**TINY, "hidden_size": 24}
  model = dit.DiT(**sizes, num_classes=10, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  time, labels = jnp.array([5.0, 900.0]), jnp.array([1, 10])
  variables = _init(model, x, 10)
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  variables = jax.tree.unflatten(tree, [
      p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  logits, exps = _attention_ops(model.apply, variables, x, time, labels,
                                num_tokens=16)
  assert logits == [jnp.float32] * TINY["depth"]
  assert set(exps) == {jnp.dtype("float32")}
  out = jax.jit(model.apply)(variables, x, time, labels)
  want = jax.jit(dit.DiT(**sizes, num_classes=10).apply)(variables, x, time,
                                                        labels)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.max(jnp.abs(out - want))) < 0.05 * float(
      jnp.max(jnp.abs(want)))


# --- The diffusion family with model.name "dit" ---------------------------------

def test_one_and_eight_devices_agree(idx_dir):
  """Two steps of class-conditional SiT (flow objective, half the labels
  dropped) on the same batch on 1 and 8 devices: same losses, gradient
  norms and parameters."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
  labels = (np.arange(16) % 10).astype(np.int32)
  batches = [{"image": images, "label": labels}] * 2
  runs = {}
  for n in (1, 8):
    config = tiny_config(idx_dir, "dit.py", **TINY_CONFIG, **{
        "mesh.num_devices": n, "diffusion.conditional": True,
        "diffusion.label_dropout": 0.5, "diffusion.objective": "flow",
        "diffusion.sampler": "euler"})
    assert isinstance(diffusion.make_model(config, 10), dit.DiT)
    runs[n] = steps_on_mesh(config, n, batches, num_train_steps=10)
  (_, s1, m1), (_, s8, m8) = runs[1], runs[8]
  assert np.all(np.isfinite(m1["loss"]))
  assert_metrics_agree(m1, m8, rtol=1e-4, names=("loss", "grad_norm"))
  assert_trees_near(s1.params, s8.params, rtol=1e-4, floor=1e-4)


def test_eps_step_loss_is_finite(idx_dir):
  """The packaged (eps, unconditional) config shrunk: one step."""
  config = tiny_config(idx_dir, "dit.py", **TINY_CONFIG,
                       **{"mesh.num_devices": 1})
  mesh = parallel.make_mesh(1)
  state = train.init_state(config, mesh, jax.random.key(0), 10)
  images = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1),
                                             dtype=np.uint8)
  batch = {"image": parallel.shard_host_array(images, mesh),
           "label": parallel.shard_host_array(np.zeros(16, np.int32), mesh)}
  state, metrics = train.compile_train_step(config, mesh)(
      state, batch, parallel.replicate(jax.random.key(1), mesh))
  assert np.isfinite(float(metrics["loss"]))
  assert float(metrics["grad_norm"]) > 0


def test_config_rules_for_dit():
  config = config_lib.load_config_file(os.path.join(REPO, "experiments",
                                                    "dit.py"))
  assert config.model.name == "dit"
  for overrides, words in [
      (["model.num_heads=3"], "not divisible by model.num_heads"),
      (["model.patch_size=3"], "not divisible into 3 x 3 patches"),
      (["model.hidden_size=18", "model.num_heads=2"], "multiple of 4"),
      (["model.name=unet"], "has no model.channels"),
      (["model.name=cnn"], "the diffusion family's networks")]:
    with pytest.raises(config_lib.ConfigError, match=words):
      config_lib.apply_overrides(config, overrides)
  config_lib.apply_overrides(config, ["diffusion.objective=flow",
                                      "diffusion.sampler=heun"])


def test_trains_evaluates_and_samples_end_to_end(tmp_path, idx_dir):
  """The trainer with the shrunk packaged config: two steps, the test loss
  and the sample grid of the evaluation (DDIM, 2 steps)."""
  config = tiny_config(idx_dir, "dit.py", **TINY_CONFIG,
                       **{"mesh.num_devices": 2, "num_steps": 2})
  workdir = str(tmp_path / "run")
  _, metrics = train.train_and_evaluate(config, workdir)
  assert np.isfinite(metrics["loss"])
  assert os.listdir(os.path.join(workdir, "samples")) == ["step_000002.png"]
