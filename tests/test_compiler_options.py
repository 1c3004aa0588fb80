"""config.xla_cpu_ynn_fusions: XLA:CPU's YNNPACK fusions on or off, per
compiled program, for the train step and every evaluation program."""

import re
import types

import jax
import numpy as np
import pytest

from conftest import tiny_config
from test_diffusion import MINI_UNET
from test_gan import _tiny_feature_network
from genimg_jax import bench, classifier, diffusion, gan, parallel, quality
from genimg_jax import train, vae
from genimg_jax import data as data_lib

OFF = {"xla_cpu_ynn_fusions": False, "xla_cpu_ynn_fusions_kept": ""}
# An instruction of a compiled program that calls a YNNPACK fusion.
YNN_FUSION = re.compile(r"%ynn_fusion[.\w]* = ")


def test_options_follow_the_config_and_the_platform(idx_dir):
  mesh = parallel.make_mesh()
  assert parallel.compiler_options(
      tiny_config(idx_dir, xla_cpu_ynn_fusions=True), mesh) == {}
  off = tiny_config(idx_dir, **OFF)
  assert parallel.compiler_options(off, mesh) == {
      parallel.YNN_FUSION_OPTION: ""}
  kept = tiny_config(idx_dir, xla_cpu_ynn_fusions=False,
                     xla_cpu_ynn_fusions_kept="reduce, Individual_Dot")
  assert parallel.compiler_options(kept, mesh) == {
      parallel.YNN_FUSION_OPTION:
          "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
  with pytest.raises(ValueError, match=r"\['convolution'\].*individual_dot"):
    parallel.compiler_options(tiny_config(
        idx_dir, xla_cpu_ynn_fusions=False,
        xla_cpu_ynn_fusions_kept="reduce,convolution"), mesh)
  # With the fusions on, the kept types do not matter.
  assert parallel.compiler_options(tiny_config(
      idx_dir, xla_cpu_ynn_fusions=True, xla_cpu_ynn_fusions_kept="reduce"),
      mesh) == {}
  # A config saved before the fields existed: XLA's defaults.
  assert parallel.compiler_options(types.SimpleNamespace(
      get=lambda key, default: default), mesh) == {}
  # Another backend's devices (e.g. an AOT compile for a TPU topology).
  tpu_mesh = types.SimpleNamespace(devices=np.array(
      [types.SimpleNamespace(platform="tpu")]))
  assert parallel.compiler_options(off, tpu_mesh) == {}


@pytest.mark.parametrize("experiment", ["cnn.py", "vae_conv.py"])
def test_train_step_compiles_without_ynn_fusions_and_computes_the_same(
    idx_dir, experiment):
  """The compiled step has YNNPACK fusions by default and none with the
  field False; two steps' loss and parameters agree to float precision."""
  hlo_on, *step_on = _two_steps(tiny_config(idx_dir, experiment,
                                            xla_cpu_ynn_fusions=True))
  hlo_off, *step_off = _two_steps(tiny_config(idx_dir, experiment, **OFF))
  assert YNN_FUSION.findall(hlo_on) and not YNN_FUSION.findall(hlo_off)
  _assert_same_step(step_off, step_on)


def _two_steps(config):
  """(compiled HLO text, state, metrics) after two train steps on 2 devices
  (the warmup's first step has learning rate 0: the second updates)."""
  mesh = parallel.make_mesh(2)
  state = train.init_state(config, mesh, jax.random.key(0), 10)
  batch = bench.synthetic_batch(config, mesh)
  rng = parallel.replicate(jax.random.key(1), mesh)
  compiled = train.compile_train_step(config, mesh).lower(
      state, batch, rng).compile()
  state, _ = compiled(state, batch, rng)
  return (compiled.as_text(), *jax.device_get(compiled(state, batch, rng)))


def _assert_same_step(step, expected):
  """The second step's loss agrees to float precision, and so do all but one
  in 10,000 parameters of each array (or one): Adam divides each gradient by its
  own magnitude, so a near-zero gradient's summation-order noise can move its
  parameter by up to the step size (one of 589,824 moved 6e-6 here)."""
  (state, metrics), (expected_state, expected_metrics) = step, expected
  np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"],
                             rtol=1e-5)

  def assert_close(path, a, b):
    off = ~np.isclose(a, b, rtol=1e-4, atol=1e-6)
    assert off.sum() <= max(1, a.size // 10_000), (
        jax.tree_util.keystr(path), off.sum(), a.size)
  jax.tree_util.tree_map_with_path(assert_close, state.params,
                                   expected_state.params)


# Programs each evaluator compiles with the run's options (the feature
# network's keeps XLA's defaults: `test_features_ignore_the_runs_options`).
EVALUATORS = [
    ("cnn.py", classifier, {}, 1),
    ("dcgan.py", gan, {}, 2),  # Sampler, standing statistics.
    ("vae_conv.py", vae, {"vae.iw_samples": 2}, 2),  # Bounds, decoder.
    ("ddpm.py", diffusion, MINI_UNET, 2),  # Sampler, test loss.
]


@pytest.mark.parametrize("experiment,family,overrides,programs", EVALUATORS)
def test_every_evaluation_program_gets_the_options(
    idx_dir, tmp_path, monkeypatch, experiment, family, overrides, programs):
  """Each jax.jit an evaluator makes (those of `parallel.replicate` and
  on-device uint8 conversion aside) carries the run's compiler options."""
  path = str(tmp_path / "net.msgpack")
  _tiny_feature_network(path, idx_dir)
  real_jit, seen = jax.jit, []

  def spy(*args, **kwargs):
    seen.append(kwargs.get("compiler_options"))
    return real_jit(*args, **kwargs)

  for fusions in (True, False):
    quality_overrides = ({} if family is classifier else
                         {"feature_network": path, "eval_samples": 16})
    config = tiny_config(idx_dir, experiment, xla_cpu_ynn_fusions=fusions,
                         **quality_overrides, **overrides)
    mesh = parallel.make_mesh()
    want = parallel.compiler_options(config, mesh)
    assert bool(want) == (not fusions)
    source = data_lib.load_split(config.data, "test")
    seen.clear()
    monkeypatch.setattr(jax, "jit", spy)
    family.make_evaluator(config, mesh, source, str(tmp_path / "run"))
    monkeypatch.setattr(jax, "jit", real_jit)
    with_options = [o for o in seen if o]
    assert len(with_options) == (programs if want else 0), seen
    assert all(o == want for o in with_options)


def test_features_ignore_the_runs_options(idx_dir, tmp_path):
  """The feature network is an instrument: configs that compile their own
  programs differently get bit-identical features (hence FID) of the same
  images."""
  path = str(tmp_path / "net.msgpack")
  _tiny_feature_network(path, idx_dir)
  mesh = parallel.make_mesh()
  features = []
  for fusions in (True, False):
    config = tiny_config(idx_dir, "dcgan.py", xla_cpu_ynn_fusions=fusions,
                         feature_network=path, eval_samples=16)
    source = data_lib.load_split(config.data, "test")
    images = source.take(np.arange(len(source)))["image"]
    features.append(quality.feature_network_for_config(config, mesh)(images))
  np.testing.assert_array_equal(features[0][0], features[1][0])
  np.testing.assert_array_equal(features[0][1], features[1][1])


def _ynn_fusion_opcodes(hlo_text: str) -> list[set[str]]:
  """The opcodes in each YNNPACK fusion's fused computation."""
  fusions = []
  for called in re.findall(r"%ynn_fusion[.\w]* = .*?calls=%([\w.\-]+)",
                           hlo_text):
    block = re.search(r"%" + re.escape(called) + r" .*?\n}\n", hlo_text,
                      re.S).group(0)
    fusions.append(set(re.findall(r" = \S+ ([\w\-]+)\(", block)))
  return fusions


def test_kept_fusion_types_are_the_only_ynn_fusions(idx_dir):
  """cnn.py keeps YNNPACK's reductions: its compiled step has YNNPACK
  fusions, each a reduction (its convolutions and dots are XLA's), and two
  steps compute what the step without any YNNPACK fusion does."""
  hlo_kept, *step_kept = _two_steps(tiny_config(
      idx_dir, "cnn.py", xla_cpu_ynn_fusions=False,
      xla_cpu_ynn_fusions_kept="reduce"))
  hlo_none, *step_none = _two_steps(tiny_config(idx_dir, "cnn.py", **OFF))
  kept = _ynn_fusion_opcodes(hlo_kept)
  assert sum("reduce" in ops for ops in kept) >= 5, kept
  assert not set().union(*kept) & {"convolution", "dot"}, kept
  assert _ynn_fusion_opcodes(hlo_none) == []
  _assert_same_step(step_kept, step_none)
