"""The Flax AutoencoderKL equals diffusers', given the same weights.

diffusers (the `test` extra, with torch from the `parity` extra) builds its
AutoencoderKL with random weights, GroupNorm affines and biases included (so
that each matters), saves it with `save_pretrained` (safetensors); the
converter (`genimg convert-autoencoder`) maps it, and both networks see the
same images: encoder moments (mean, logvar) and the decoder's output must
agree to float32 rounding. Small configs at 64 and 256 pixels, and SD 1.x's
full config at 64. The converter's refusals (a missing, misshapen or extra
tensor; a corrupt output) need only numpy and safetensors.
CI sets GENIMG_REQUIRE_PARITY=1, so a missing torch or diffusers fails
instead of skipping.
"""

import importlib
import json
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genimg_jax import autoencoder, cli, quality
from genimg_jax.nets.autoencoder_kl import AutoencoderKL

SD_NUM_PARAMS = 83_653_863  # SD 1.x's VAE (sd-vae-ft-mse), as diffusers'.
# Float32 rounding, relative to the largest output: observed up to 2e-5 (the
# 256-pixel decoder), and the tolerance leaves room for other CPUs' summation
# orders. The planted bugs tried (downsampling padding, kernel orientation,
# attention scale, upsampling, residuals) exceed it > 100x; GroupNorm's
# epsilon 1e-5 for 1e-6 is at its edge in the whole network and 1,000x over
# it in the ResnetBlock test made for it.
TOLERANCE = 2e-4
SMALL = {"block_out_channels": (32, 64, 64), "layers_per_block": 1,
         "norm_num_groups": 8}


def _require(name):
  if os.environ.get("GENIMG_REQUIRE_PARITY"):
    return importlib.import_module(name)
  return pytest.importorskip(name)


def _diffusers_vae(config, seed=0):
  """diffusers' AutoencoderKL(**config) with random weights: torch's default
  init for conv/linear weights, and every 1-D parameter (biases, GroupNorm
  scales and offsets) redrawn so that none is 0 or 1."""
  torch = _require("torch")
  diffusers = _require("diffusers")
  levels = len(config["block_out_channels"])
  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKL(
      down_block_types=("DownEncoderBlock2D",) * levels,
      up_block_types=("UpDecoderBlock2D",) * levels, **config).eval()
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if p.ndim == 1 and name.endswith("bias"):
        p.normal_(0, 0.2)
      elif p.ndim == 1:
        p.uniform_(0.5, 1.5)
  return vae


def _torch_outputs(vae, x_BHWC):
  """(mean, logvar, decoded mean) of diffusers' VAE, NHWC numpy."""
  torch = _require("torch")
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  with torch.no_grad():
    posterior = vae.encode(torch.from_numpy(x_BHWC).permute(0, 3, 1, 2))
    dist = posterior.latent_dist
    decoded = vae.decode(dist.mean).sample
  return nhwc(dist.mean), nhwc(dist.logvar), nhwc(decoded)


def _assert_close(ours, theirs, what):
  scale = np.abs(theirs).max()
  assert scale > 0.1, what  # Not a dead network.
  err = np.abs(np.asarray(ours) - theirs).max()
  assert err <= TOLERANCE * scale, (
      f"{what}: max error {err:.3g}, scale {scale:.3g}")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """(diffusers VAE, its save_pretrained directory, converted file)."""
  vae = _diffusers_vae(SMALL)
  directory = tmp_path_factory.mktemp("vae") / "small"
  vae.save_pretrained(directory, safe_serialization=True)
  out = str(directory) + ".msgpack"
  autoencoder.convert_diffusers(str(directory), out)
  return vae, directory, out


def test_sd_config_parameter_count():
  """The defaults are SD 1.x's VAE: 83,653,863 parameters."""
  shapes = jax.eval_shape(lambda: AutoencoderKL().init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == SD_NUM_PARAMS


@pytest.mark.parametrize("size", [64, 256])
def test_small_config_equals_diffusers(small, size):
  vae, _, path = small
  model, variables = autoencoder.load(path)
  assert model.norm_num_groups == 8 and model.block_out_channels == (32, 64,
                                                                     64)
  x = np.random.default_rng(size).uniform(-1, 1, (2, size, size, 3)).astype(
      np.float32)
  mean, logvar, decoded = _torch_outputs(vae, x)
  assert mean.shape == (2, size // 4, size // 4, 4)
  encode = jax.jit(lambda v, x: model.apply(v, x, method="encode"))
  decode = jax.jit(lambda v, z: model.apply(v, z, method="decode"))
  ours_mean, ours_logvar = encode(variables, x)
  _assert_close(ours_mean, mean, "mean")
  _assert_close(ours_logvar, logvar, "logvar")
  _assert_close(decode(variables, mean), decoded, "decoded")
  # The two images differ by far more than the tolerance.
  assert np.abs(mean[0] - mean[1]).max() > 100 * TOLERANCE * np.abs(
      mean).max()


def test_logvar_is_clamped_as_diffusers(small):
  """logvar in [-30, 20]: quant_conv's logvar biases pushed to +-100."""
  torch = _require("torch")
  import copy  # pylint: disable=g-import-not-at-top
  vae, _, path = small
  vae = copy.deepcopy(vae)
  model, variables = autoencoder.load(path)
  bias = np.array([0, 0, 0, 0, 100, -100, 100, -100], np.float32)
  with torch.no_grad():
    vae.quant_conv.bias += torch.from_numpy(bias)
  variables = jax.tree.map(lambda x: x, variables)
  variables["params"]["quant_conv"]["bias"] = (
      variables["params"]["quant_conv"]["bias"] + bias)
  x = np.random.default_rng(2).uniform(-1, 1, (1, 32, 32, 3)).astype(
      np.float32)
  mean, logvar, _ = _torch_outputs(vae, x)
  ours_mean, ours_logvar = model.apply(variables, x, method="encode")
  assert set(np.unique(logvar)) == {-30.0, 20.0}
  np.testing.assert_array_equal(ours_logvar, logvar)
  _assert_close(ours_mean, mean, "mean")


def test_call_decodes_the_mean_or_a_posterior_sample(small):
  _, _, path = small
  model, variables = autoencoder.load(path)
  x = np.random.default_rng(1).uniform(-1, 1, (1, 32, 32, 3)).astype(
      np.float32)
  rng = jax.random.key(3)
  decoded, mean, logvar = model.apply(variables, x)
  sampled, _, _ = model.apply(variables, x, rng)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
  np.testing.assert_allclose(
      decoded, model.apply(variables, mean, method="decode"), atol=1e-6)
  np.testing.assert_allclose(
      sampled, model.apply(variables, z, method="decode"), atol=1e-6)
  assert np.abs(sampled - decoded).max() > 1e-3


def test_sd_config_equals_diffusers(tmp_path):
  """SD 1.x's full VAE (83.6M parameters) at 64 x 64."""
  config = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2}
  vae = _diffusers_vae(config, seed=1)
  assert sum(p.numel() for p in vae.parameters()) == SD_NUM_PARAMS
  vae.save_pretrained(tmp_path / "sd", safe_serialization=True)
  meta = autoencoder.convert_diffusers(str(tmp_path / "sd"),
                                       str(tmp_path / "sd.msgpack"))
  assert meta["num_params"] == SD_NUM_PARAMS
  model, variables = autoencoder.load(str(tmp_path / "sd.msgpack"))
  assert model == AutoencoderKL()  # The defaults: SD 1.x's config.
  x = np.random.default_rng(0).uniform(-1, 1, (1, 64, 64, 3)).astype(
      np.float32)
  mean, logvar, decoded = _torch_outputs(vae, x)
  ours_mean, ours_logvar = jax.jit(
      lambda v, x: model.apply(v, x, method="encode"))(variables, x)
  _assert_close(ours_mean, mean, "mean")
  _assert_close(ours_logvar, logvar, "logvar")
  _assert_close(jax.jit(lambda v, z: model.apply(v, z, method="decode"))(
      variables, mean), decoded, "decoded")


def test_legacy_attention_names_and_a_single_file(small, tmp_path):
  """Older checkpoints name the attention query/key/value/proj_attn; a
  single .safetensors file has its config read off its shapes."""
  st = _require("safetensors.numpy")
  _, directory, path = small
  state_dict = st.load_file(str(directory /
                                "diffusion_pytorch_model.safetensors"))
  renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
             ".to_out.0.": ".proj_attn."}
  legacy = {}
  for key, value in state_dict.items():
    for new, old in renames.items():
      key = key.replace(new, old)
    legacy[key] = value
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  single = str(tmp_path / "legacy.safetensors")
  st.save_file(legacy, single)
  assert cli.main(["convert-autoencoder", "--input", single, "--output",
                   str(tmp_path / "legacy.msgpack")]) == 0
  model, variables = autoencoder.load(str(tmp_path / "legacy.msgpack"))
  _, expected = autoencoder.load(path)
  jax.tree.map(np.testing.assert_array_equal, variables, expected)
  # All but norm_num_groups (not in the weights: SD's 32) read off shapes.
  assert model == AutoencoderKL(**{**SMALL, "norm_num_groups": 32})


# The converter's checks: numpy and safetensors only.


def _fake_checkpoint(directory, config, rng_seed=0):
  """A diffusers-format directory for AutoencoderKL(**config) with random
  weights, written without torch: (directory, state dict)."""
  st = _require("safetensors.numpy")
  model = AutoencoderKL(**config)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3))))["params"]
  rng = np.random.default_rng(rng_seed)
  state_dict = {}
  for key, spec in flax.traverse_util.flatten_dict(shapes, sep="/").items():
    shape = spec.shape
    if len(shape) == 4:
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif len(shape) == 2:
      shape = shape[::-1]
    state_dict[autoencoder.diffusers_name(key)] = rng.normal(
        size=shape).astype(np.float32)
  os.makedirs(directory, exist_ok=True)
  st.save_file(state_dict,
               os.path.join(directory, "diffusion_pytorch_model.safetensors"))
  levels = len(config["block_out_channels"])
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"_class_name": "AutoencoderKL",
               "down_block_types": ["DownEncoderBlock2D"] * levels,
               "up_block_types": ["UpDecoderBlock2D"] * levels,
               "act_fn": "silu", **config}, f)
  return state_dict


TINY = {"block_out_channels": [8, 16], "layers_per_block": 1,
        "norm_num_groups": 4}


def _one_line_error(func, match):
  with pytest.raises(ValueError, match=match) as error:
    func()
  assert "\n" not in str(error.value)
  return str(error.value)


def test_converter_refuses_a_missing_misshapen_or_extra_tensor(tmp_path):
  st = _require("safetensors.numpy")
  good = _fake_checkpoint(tmp_path / "good", TINY)
  meta = autoencoder.convert_diffusers(str(tmp_path / "good"),
                                       str(tmp_path / "good.msgpack"))
  assert meta["config"]["block_out_channels"] == [8, 16]
  weights = "diffusion_pytorch_model.safetensors"
  cases = {
      "missing": ({k: v for k, v in good.items()
                   if k != "decoder.up_blocks.1.resnets.1.conv2.weight"},
                  r"'decoder.up_blocks.1.resnets.1.conv2.weight' is missing"),
      "misshapen": ({**good, "encoder.mid_block.attentions.0.to_q.weight":
                     np.zeros((16, 8), np.float32)},
                    r"'encoder.mid_block.attentions.0.to_q.weight' has shape"
                    r" \(16, 8\)"),
      "extra": ({**good, "encoder.down_blocks.2.resnets.0.conv1.weight":
                 np.zeros((1,), np.float32)},
                r"1 tensor\(s\) .* first "
                r"'encoder.down_blocks.2.resnets.0.conv1.weight'"),
  }
  for name, (state_dict, match) in cases.items():
    _fake_checkpoint(tmp_path / name, TINY)
    st.save_file(state_dict, str(tmp_path / name / weights))
    _one_line_error(lambda n=name: autoencoder.convert_diffusers(
        str(tmp_path / n), str(tmp_path / f"{n}.msgpack")), match)
    assert not os.path.exists(tmp_path / f"{name}.msgpack")
  # The command says so in one line and exits 2.
  assert cli.main(["convert-autoencoder", "--input",
                   str(tmp_path / "missing"), "--output",
                   str(tmp_path / "x.msgpack")]) == 2
  assert cli.main(["convert-autoencoder", "--input",
                   str(tmp_path / "nothing"), "--output",
                   str(tmp_path / "x.msgpack")]) == 2


def test_converter_reads_float16_and_bfloat16(tmp_path):
  st = _require("safetensors.numpy")
  weights = "diffusion_pytorch_model.safetensors"
  state_dict = _fake_checkpoint(tmp_path / "f32", TINY)
  _, config, _ = autoencoder.read_checkpoint(str(tmp_path / "f32"))
  expected = autoencoder.variables_from_diffusers(state_dict, config)
  for dtype in (np.float16, jnp.bfloat16):
    name = np.dtype(dtype).name
    _fake_checkpoint(tmp_path / name, TINY)
    st.save_file({k: v.astype(dtype) for k, v in state_dict.items()},
                 str(tmp_path / name / weights))
    autoencoder.convert_diffusers(str(tmp_path / name),
                                  str(tmp_path / f"{name}.msgpack"))
    _, variables = autoencoder.load(str(tmp_path / f"{name}.msgpack"))
    for ours, full in zip(jax.tree.leaves(variables),
                          jax.tree.leaves(expected)):
      assert ours.dtype == np.float32
      np.testing.assert_array_equal(ours, full.astype(dtype).astype(
          np.float32))


def test_loader_refuses_a_corrupt_file(tmp_path):
  _fake_checkpoint(tmp_path / "vae", TINY)
  path = str(tmp_path / "vae.msgpack")
  meta = autoencoder.convert_diffusers(str(tmp_path / "vae"), path)
  assert meta["sha256"] == quality.file_sha256(path)
  assert meta["source_sha256"] == quality.file_sha256(
      str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
  corrupt = tmp_path / "corrupt.msgpack"
  corrupt.write_bytes(open(path, "rb").read()[:-1] + b"\0")
  (tmp_path / "corrupt.msgpack.json").write_text(open(path + ".json").read())
  _one_line_error(lambda: autoencoder.load(str(corrupt)), "corrupt")
  with pytest.raises(FileNotFoundError, match="convert-autoencoder"):
    autoencoder.load(str(tmp_path / "missing.msgpack"))


def test_resnet_block_equals_diffusers_on_small_activations():
  """GroupNorm's epsilon (1e-6) matters where a group's variance is near
  it; the whole network's random activations are far larger, so one
  ResnetBlock2D is compared on inputs of standard deviation 1e-3."""
  torch = _require("torch")
  resnet = _require("diffusers.models.resnet")
  from genimg_jax.nets import autoencoder_kl  # pylint: disable=g-import-not-at-top
  torch.manual_seed(2)
  block = resnet.ResnetBlock2D(in_channels=16, out_channels=32,
                               temb_channels=None, groups=8, eps=1e-6).eval()
  with torch.no_grad():
    for name, p in block.named_parameters():
      if p.ndim == 1:
        p.normal_(0, 0.2) if name.endswith("bias") else p.uniform_(0.5, 1.5)
  ours = autoencoder_kl.ResnetBlock(32, 8)
  x = 1e-3 * np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype(
      np.float32)
  template = jax.eval_shape(lambda: ours.init(jax.random.key(0), x))
  params = autoencoder.params_from_state_dict(
      template["params"], {k: v.numpy() for k, v in block.state_dict().items()})
  with torch.no_grad():
    theirs = block(torch.from_numpy(x).permute(0, 3, 1, 2), None)
  _assert_close(ours.apply({"params": params}, x),
                theirs.permute(0, 2, 3, 1).numpy(), "resnet block")
