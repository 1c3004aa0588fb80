"""`genimg bench`: what it reports (never how fast)."""

import functools
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from genimg_jax import aot, bench, classifier, diffusion, parallel, train
from genimg_jax.nets import dit


def test_flops_match_a_hand_count_for_a_dense_layer():
  x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
  lowered = jax.jit(lambda a, b: a @ b).lower(x, w)
  assert bench.flops_of(lowered) == 2 * 8 * 16 * 4
  assert bench.flops_of(lowered.compile()) == 2 * 8 * 16 * 4


def test_cnn_forward_flops_match_a_hand_count():
  model = classifier.CNN(10)
  x = jnp.zeros((4, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  lowered = jax.jit(model.apply).lower(variables, x)
  macs = (26 * 26 * 32 * 9 * 1 + 11 * 11 * 64 * 9 * 32 + 3 * 3 * 128 * 9 * 64
          + 1152 * 512 + 512 * 10)
  assert bench.flops_of(lowered) == pytest.approx(4 * 2 * macs, rel=0.05)
  assert bench.flops_of(lowered.compile()) == pytest.approx(
      4 * 2 * macs, rel=0.05)


def test_bench_record_fields(tmp_path):
  out = tmp_path / "bench.jsonl"
  records = bench.run(["cnn"], [16], [1, 8], steps=2, dtypes="float32",
                      input_pipeline="synthetic", output=str(out))
  assert [r["devices"] for r in records] == [1, 8]
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert lines == records
  for r in records:
    for key in ("model", "batch", "devices", "device_kind", "dtype",
                "compile_s", "step_ms_median", "step_ms_min", "step_ms_max",
                "images_per_s", "flops_per_step", "flops_per_s",
                "peak_flops_per_s", "fraction_of_peak", "scaling_efficiency"):
      assert key in r, key
    assert r["flops_per_step"] > 0
    assert r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
    assert r["images_per_s"] == pytest.approx(16 / r["step_ms_median"] * 1e3)
    assert 0 < r["fraction_of_peak"]
  assert records[0]["scaling_efficiency"] == 1.0
  # Memory, for the sweep's batch prediction: the CPU reports no limit.
  assert records[0]["memory_bytes"] > records[0]["state_bytes"] > 0
  assert records[0]["memory_limit_bytes"] is None
  # FLOPs are of the whole global step as lowered, before any backend pass:
  # the same count on 8 devices as on 1 (not 8 copies of the step, and not
  # the partitioned programs' counts, which add the replicated update).
  assert records[1]["flops_per_step"] == records[0]["flops_per_step"]
  # A train step costs about 3 forward passes (forward, 2 backward matmuls).
  assert 2.5 < records[0]["flops_per_step"] / (16 * 7.37e6) < 3.5


def test_bench_profile_lists_the_top_ops(tmp_path):
  records = bench.run(["cnn"], [16], [2], steps=2, dtypes="float32",
                      input_pipeline="synthetic", output=None,
                      profile_dir=str(tmp_path))
  record = records[0]
  assert record["profile_dir"] == os.path.join(str(tmp_path),
                                               "cnn_b16_d2_float32")
  assert glob.glob(os.path.join(record["profile_dir"], "**",
                                "*perfetto_trace.json.gz"), recursive=True)
  ms = [op["ms_per_step"] for op in record["top_ops"]]
  assert 0 < len(ms) <= 10 and min(ms) > 0
  assert ms == sorted(ms, reverse=True)
  # The CNN's time is in its layers: some top op comes from a Conv or Dense.
  assert any(("Conv" in op["layer"] or "Dense" in op["layer"] or
              "convolution" in op["layer"]) for op in record["top_ops"])


def test_op_sources_name_the_layer_of_each_op():
  compiled = jax.jit(lambda x, w: jnp.tanh(x @ w)).lower(
      jnp.ones((8, 16)), jnp.ones((16, 4))).compile()
  sources = bench._op_sources(compiled.as_text())  # pylint: disable=protected-access
  assert any(v.endswith("/tanh") for v in sources.values()), sources
  assert any(v.endswith("/dot_general") for v in sources.values()), sources
  # A fusion without metadata is named by its fused computation's root.
  hlo = """%fused_computation.1 (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %convolution.3 = f32[2]{0} convolution(%p, %p), window={size=1}
}

ENTRY %main (a: f32[2]) -> f32[2] {
  %a = f32[2]{0} parameter(0), metadata={op_name="a"}
  ROOT %ynn_fusion.1 = f32[2]{0} fusion(%a), kind=kCustom, calls=%fused_computation.1
}"""
  sources = bench._op_sources(hlo)  # pylint: disable=protected-access
  assert sources["ynn_fusion.1"] == "convolution f32[2]{0}"
  assert sources["a"] == "a"


def test_model_names_keep_config_arguments_with_commas():
  assert bench.split_models("ddpm:cifar10,full,cnn,all") == [
      "ddpm:cifar10,full", "cnn", "all"]
  assert bench.split_models("cnn,vae_mlp") == ["cnn", "vae_mlp"]
  assert bench.split_models("cnn,gpt") == ["cnn", "gpt"]  # A typo stays.
  name = bench.split_models("resnet:cifar10,full,cnn")[0]
  config = bench.load_model_config(name, 16, "float32", 1)
  assert config.model.width == 32 and config.data.image_shape == (32, 32, 3)
  assert bench.load_model_config("resnet", 16, "float32", 1).model.width == 16


def test_bench_unknown_model():
  with pytest.raises(ValueError, match="Unknown model 'gpt'"):
    bench.load_model_config("gpt", 16, "float32", 1)


def test_train_step_compiles_once_and_keeps_the_host_out():
  config = bench.load_model_config("cnn", 16, "float32", 0)
  mesh = parallel.make_mesh()
  state = train.init_state(config, mesh, jax.random.key(0), 10)
  train_step = train.compile_train_step(config, mesh)
  batch = bench.synthetic_batch(config, mesh)
  rng = jax.device_put(jax.random.key(1), parallel.replicated(mesh))
  state, _ = train_step(state, batch, rng)
  with jax.transfer_guard("disallow"):
    for _ in range(3):
      state, metrics = train_step(state, batch, rng)
  assert train_step._cache_size() == 1  # pylint: disable=protected-access
  assert int(state.step) == 4
  assert np.isfinite(float(metrics["loss"]))


def test_bench_cli_with_the_real_input_pipeline(tmp_path, idx_dir, monkeypatch,
                                                capsys):
  from genimg_jax import cli  # pylint: disable=g-import-not-at-top
  real_load, fusions = bench.load_model_config, []

  def tiny_data(*args):
    config = real_load(*args)
    fusions.append(config.xla_cpu_ynn_fusions)
    config.unlock()
    config.data.idx_dir = idx_dir
    return config
  monkeypatch.setattr(bench, "load_model_config", tiny_data)
  out = tmp_path / "b.jsonl"
  assert cli.main(["bench", "--model", "vae", "--batch", "16", "--steps", "2",
                   "--input", "real", "--devices", "2", "--output",
                   str(out), "--profile", str(tmp_path / "trace"),
                   "--config.xla_cpu_ynn_fusions=true"]) == 0
  record = json.loads(out.read_text())
  # --config.KEY=VALUE overrides reach the model's config (vae_conv.py's
  # own value is False) and the record (each load: the check before
  # anything compiles, then the run).
  assert fusions == [True, True]
  assert record["overrides"] == ["xla_cpu_ynn_fusions=true"]
  assert record["top_ops"] and record["profile_dir"].startswith(
      str(tmp_path / "trace"))
  assert record["input"] == "real" and record["devices"] == 2
  assert record["model"] == "vae" and record["flops_per_step"] > 0
  assert "vae" in capsys.readouterr().out


def _fake_record(model, batch, steps, warmup=2, dtype="float32", devices=1,
                 overrides=()):
  """What bench_one returns, without compiling anything."""
  del steps, warmup, overrides
  return {"model": model, "batch": batch, "devices": devices, "dtype": dtype,
          "device_kind": "cpu", "float32_matmul": "float32",
          "step_ms_median": 1.0, "images_per_s": batch * 1e3,
          "flops_per_step": 1e9, "flops_per_s": 1e12,
          "peak_flops_per_s": 1e13, "peak_kind": "fp32",
          "fraction_of_peak": 0.1}


def test_sweep_doubles_the_batch_for_each_dtype(tmp_path, capsys):
  out = tmp_path / "sweep.jsonl"
  out.write_text('{"earlier": 1}\n')  # Lines of an earlier run stay.
  records = bench.sweep(["cnn"], ["float32", "bfloat16"], start_batch=8,
                        max_batch=16, steps=2, warmup=1, output=str(out))
  assert [(r["dtype"], r["batch"], r["devices"]) for r in records] == [
      ("float32", 8, 1), ("float32", 16, 1), ("bfloat16", 8, 1),
      ("bfloat16", 16, 1)]
  assert [r.get("stop") for r in records] == [None, "max_batch"] * 2
  assert not any(r.get("largest_fitting") for r in records)
  assert records[0]["float32_matmul"] == "float32"  # A CPU.
  assert records[2]["peak_kind"] == "bf16"
  lines = bench.read_records(str(out))
  assert lines == [{"earlier": 1}] + records
  table = capsys.readouterr().out
  assert "float32 matmuls ran as: float32" in table
  assert table.count("max") == 2


def test_sweep_stops_doubling_at_out_of_memory(monkeypatch):
  calls = []

  def fake(model, batch, steps, warmup=2, dtype="float32", devices=1,
           overrides=()):
    calls.append((dtype, batch))
    if batch >= (32 if dtype == "float32" else 8):
      raise jax.errors.JaxRuntimeError(
          "RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    return _fake_record(model, batch, steps, warmup, dtype, devices)
  monkeypatch.setattr(bench, "bench_one", fake)
  records = bench.sweep(["cnn"], ["float32", "bfloat16"], start_batch=8,
                        max_batch=1024)
  assert calls == [("float32", 8), ("float32", 16), ("float32", 32),
                   ("bfloat16", 8)]
  assert [r["batch"] for r in records] == [8, 16, 8]
  assert records[1]["stop"] == "oom" and records[1]["largest_fitting"]
  assert records[1]["oom_batch"] == 32
  assert records[2]["skipped"] == "out of memory at batch 8"

  # The error XLA raises for an allocation too large, as the sweep sees it.
  with pytest.raises(Exception) as error:
    jax.jit(lambda: jnp.zeros((1 << 45,)))()
  assert bench.is_out_of_memory(error.value)


def test_sweep_records_other_errors_and_goes_on(monkeypatch, capsys):
  """A combination that fails (not out of memory) ends itself, not the
  sweep: one broken model must not lose a GPU run's other rows."""
  def flaky(model, batch, steps, warmup=2, dtype="float32", devices=1,
            overrides=()):
    if model == "vae" or (dtype == "bfloat16" and batch == 16):
      raise jax.errors.JaxRuntimeError("INTERNAL: something else\nmore")
    return _fake_record(model, batch, steps, warmup, dtype, devices)
  monkeypatch.setattr(bench, "bench_one", flaky)
  records = bench.sweep(["vae", "cnn"], ["float32", "bfloat16"],
                        start_batch=8, max_batch=32)
  assert [(r["model"], r["dtype"], r["batch"]) for r in records] == [
      ("vae", "float32", 8), ("vae", "bfloat16", 8), ("cnn", "float32", 8),
      ("cnn", "float32", 16), ("cnn", "float32", 32), ("cnn", "bfloat16", 8)]
  assert records[0]["skipped"] == records[1]["skipped"] == (
      "failed at batch 8: JaxRuntimeError: INTERNAL: something else")
  assert records[0]["error"] == "JaxRuntimeError: INTERNAL: something else"
  assert records[4]["stop"] == "max_batch" and "error" not in records[4]
  assert records[5]["stop"] == "error" and records[5]["error_batch"] == 16
  assert not records[5]["largest_fitting"]
  out = capsys.readouterr()
  assert "Traceback" in out.err and "something else" in out.err
  assert "error@16" in out.out

  # The CLI runs the rest, then exits 1 naming what failed.
  from genimg_jax import cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["bench", "--sweep", "--model", "vae,cnn", "--batch", "8",
                   "--max-batch", "8"]) == 1
  assert "failed: vae float32, vae bfloat16" in capsys.readouterr().err


def test_sweep_jumps_to_the_batch_memory_allows(monkeypatch):
  """Where the device reports its memory, the sweep jumps to the largest
  power-of-two batch predicted to fit, and bisects back after a jump that
  does not fit, until twice a fitting batch is known not to."""
  state, per_image, limit = 1000, 10, 11_000  # Predicted: up to 800 fits.
  calls = []

  def fake(model, batch, steps, warmup=2, dtype="float32", devices=1,
           overrides=(), fits_below=400):
    calls.append(batch)
    if batch >= fits_below:  # The device holds less than predicted.
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory")
    record = _fake_record(model, batch, steps, warmup, dtype, devices)
    record.update(memory_bytes=state + per_image * batch, state_bytes=state,
                  memory_limit_bytes=limit)
    return record
  monkeypatch.setattr(bench, "bench_one", fake)
  records = bench.sweep(["cnn"], ["float32"], start_batch=8, max_batch=4096)
  # 8 fits; 512 is the largest predicted to fit in 80% of the limit (it
  # does not), halfway back is 64 (fits), then 256 (the largest predicted
  # below 512, fits), and 512 is known not to fit: done.
  assert calls == [8, 512, 64, 256]
  assert [r["batch"] for r in records] == [8, 64, 256]
  assert records[-1]["stop"] == "oom" and records[-1]["largest_fitting"]
  assert records[-1]["oom_batch"] == 512
  assert bench.next_sweep_batch(records[0], 4096) == 512
  assert bench.next_sweep_batch(records[0], 128) == 128  # max_batch caps it.
  assert bench.next_sweep_batch(records[0], 4096, oom_batch=256) == 128
  assert bench.next_sweep_batch(records[-1], 4096, oom_batch=512) is None
  no_memory = {k: v for k, v in records[0].items() if "memory" not in k}
  assert bench.next_sweep_batch(no_memory, 4096) == 16  # Doubling.

  # When the prediction holds, the sweep goes straight to max_batch.
  calls.clear()
  monkeypatch.setattr(bench, "bench_one", functools.partial(
      fake, fits_below=10**9))
  records = bench.sweep(["cnn"], ["float32"], start_batch=8, max_batch=256)
  assert calls == [8, 256] and records[-1]["stop"] == "max_batch"


def test_gpu_bench_script_runs_on_cpu(tmp_path):
  """experiments/gpu_bench.sh end to end, tiny, on this machine's CPU: the
  script that a lent GPU gets one try at. An unknown model is reported and
  the script exits 1, with the other rows and the table kept."""
  env = {**os.environ, "MODE": "sweep", "MODELS": "vae_mlp,gpt",
         "DTYPE": "float32,bfloat16",
         "START_BATCH": "8", "MAX_BATCH": "16", "BUDGET": "1000",
         "HARD_STOP": "1100", "PYTHON": sys.executable}
  out = subprocess.run(
      ["bash", os.path.join(REPO, "experiments", "gpu_bench.sh"),
       str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
  assert "failed: gpt float32, gpt bfloat16" in out.stderr
  records = bench.read_records(str(tmp_path / "gpu_bench.jsonl"))
  assert [(r["model"], r["dtype"], r["batch"]) for r in records] == [
      ("vae_mlp", "float32", 8), ("vae_mlp", "float32", 16),
      ("vae_mlp", "bfloat16", 8), ("vae_mlp", "bfloat16", 16),
      ("gpt", "float32", 8), ("gpt", "bfloat16", 8)]
  assert all("Unknown model 'gpt'" in r["skipped"] for r in records[4:])
  table = (tmp_path / "gpu_bench.txt").read_text()
  assert table.count("max_batch") == 2 and "skipped: failed" in table


def test_gpu_bench_rows_run_on_cpu(tmp_path):
  """experiments/gpu_bench.sh's default rows, shrunk for this CPU (a DiT of
  depth 1 and width 32 on latent_dit's synthetic 7 x 7 x 4 latents, batch
  8; float32 alone: the order of dtypes and remats is
  test_run_rows_for_each_remat_and_dtype_and_failures_go_on's): remat none
  and blocks, a table with MFU, and the published numbers beside it."""
  env = {**os.environ, "MODELS": "latent_dit", "STEPS": "1",
         "DTYPE": "float32",
         "OVERRIDES": "--config.batch_size=8 --config.model.depth=1 "
                      "--config.model.hidden_size=32 --config.model.num_heads=2",
         "HARD_STOP": "600", "PYTHON": sys.executable}
  out = subprocess.run(
      ["bash", os.path.join(REPO, "experiments", "gpu_bench.sh"),
       str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  records = bench.read_records(str(tmp_path / "gpu_bench.jsonl"))
  assert [(r["model"], r["dtype"], r["remat"], r["batch"]) for r in records
          ] == [("latent_dit", "float32", "none", 8),
                ("latent_dit", "float32", "blocks", 8)]
  assert all(r["fraction_of_peak"] > 0 and r["devices"] == 1
             for r in records)
  text = (tmp_path / "gpu_bench.txt").read_text()
  assert "MFU %" in text and "672 images/s per" in text
  assert "about 107 images/s" in text


def test_sweep_keeps_to_the_time_budget(monkeypatch, capsys):
  now = [0.0]

  def fake(*args, **kwargs):
    now[0] += 10  # Each run takes 10 s.
    return _fake_record(*args, **kwargs)
  monkeypatch.setattr(bench, "bench_one", fake)
  # 30 s for 4 combinations, 10 s a run: each of the first three gets one
  # run (a second would end past its share), the fourth finds none left.
  records = bench.sweep(["cnn", "vae"], ["float32", "bfloat16"],
                        start_batch=8, max_batch=64,
                        time_budget_s=30, clock=lambda: now[0])
  assert [(r["model"], r["dtype"], r["batch"]) for r in records] == [
      ("cnn", "float32", 8), ("cnn", "bfloat16", 8), ("vae", "float32", 8),
      ("vae", "bfloat16", 8)]
  assert [r.get("stop") for r in records[:3]] == ["time"] * 3
  assert "skipped" in records[3] and "skipped" not in records[2]
  # A long budget lets the same fake sweep double up to max_batch.
  records = bench.sweep(["cnn"], ["float32"], start_batch=8, max_batch=64,
                        time_budget_s=1000, clock=lambda: now[0])
  assert [r["batch"] for r in records] == [8, 16, 32, 64]
  assert records[-1]["stop"] == "max_batch"
  # No budget: nothing runs, every combination is a skipped line.
  monkeypatch.setattr(bench, "bench_one", None)
  records = bench.sweep(["cnn"], ["float32", "bfloat16"], start_batch=8,
                        max_batch=16, time_budget_s=0)
  assert all("time budget" in r["skipped"] for r in records)
  assert "skipped: time budget" in capsys.readouterr().out


def test_float32_matmul_and_its_peak_on_gpus(monkeypatch):
  h100 = type("Device", (), {"platform": "gpu", "compute_capability": "9.0",
                             "device_kind": "NVIDIA H100 80GB HBM3"})()
  v100 = type("Device", (), {"platform": "gpu", "compute_capability": "7.0",
                             "device_kind": "Tesla V100-SXM2-16GB"})()
  monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
  assert bench.float32_matmul(h100) == "tf32"
  assert bench.float32_matmul(v100) == "float32"
  assert bench.float32_matmul(jax.devices()[0]) == "float32"  # CPU.
  for precision in ("highest", "float32"):
    with jax.default_matmul_precision(precision):
      assert bench.float32_matmul(h100) == "float32"
  with jax.default_matmul_precision("tensorfloat32"):
    assert bench.float32_matmul(h100) == "tf32"
  monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
  assert bench.float32_matmul(h100) == "float32"
  assert bench.peak_flops(h100, "float32", "tf32") == (
      494.7e12, "published", "tf32")
  assert bench.peak_flops(h100, "float32", "float32") == (
      67e12, "published", "fp32")
  assert bench.peak_flops(h100, "bfloat16", "tf32") == (
      989e12, "published", "bf16")
  # No TF32 on a V100: its float32 peak even if asked for tf32.
  assert bench.peak_flops(v100, "float32", "tf32")[2] == "fp32"
  # A published peak counts once per device of the mesh.
  mesh8 = parallel.make_mesh(8)
  assert bench.peak_flops(h100, "float32", "float32", mesh8) == (
      8 * 67e12, "published", "fp32")


def test_a_cpu_peak_is_measured_on_the_whole_mesh_at_once(monkeypatch):
  """XLA:CPU runs one device's matmul on every core, so the host's peak is
  measured with all devices busy, not one device's times the count."""
  mesh8 = parallel.make_mesh(8)
  rate = bench.measured_cpu_peak(n=64, repeats=1, mesh=mesh8)
  assert 0 < rate < float("inf")
  calls = []
  def fake_peak(dtype, mesh=None):
    calls.append((jnp.dtype(dtype), mesh))
    return 1e11
  monkeypatch.setattr(bench, "measured_cpu_peak", fake_peak)
  cpu = jax.devices()[0]
  assert bench.peak_flops(cpu, "float32", "float32", mesh8) == (
      1e11, "measured matmul", "fp32")
  assert bench.peak_flops(cpu, "bfloat16", "float32", mesh8)[0] == 1e11
  assert calls == [(jnp.dtype("float32"), mesh8), (jnp.dtype("bfloat16"),
                                                    mesh8)]
  # The record's fraction is of that one number.
  record = bench.bench_one("cnn", 16, steps=1, warmup=1, devices=8)
  assert record["peak_flops_per_s"] == 1e11
  assert record["fraction_of_peak"] == pytest.approx(
      record["flops_per_s"] / 1e11)


def test_bench_cli_sweep(tmp_path, monkeypatch, capsys):
  from genimg_jax import cli  # pylint: disable=g-import-not-at-top
  seen = []

  def fake(*args, **kwargs):
    seen.append(jax.config.jax_default_matmul_precision)
    return _fake_record(*args, **kwargs)
  monkeypatch.setattr(bench, "bench_one", fake)
  out = tmp_path / "s.jsonl"
  try:
    assert cli.main(["bench", "--sweep", "--model", "cnn:mnist,full,vae",
                     "--dtype",
                     "float32", "--batch", "32", "--max-batch", "64",
                     "--matmul-precision", "highest", "--output",
                     str(out)]) == 0
  finally:
    jax.config.update("jax_default_matmul_precision", None)
  records = bench.read_records(str(out))
  assert [(r["model"], r["batch"]) for r in records] == [
      ("cnn:mnist,full", 32), ("cnn:mnist,full", 64), ("vae", 32),
      ("vae", 64)]
  assert seen == ["highest"] * 4
  assert "images/s" in capsys.readouterr().out


def test_bench_real_input_on_mock_celeba():
  """`--model dcgan:celeb_a64 --input real`: the config's argument picks the
  data set (unlabelled), whose on-demand pipeline (read, crop, resize) feeds
  the steps."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=64):
    record = bench.bench_one("dcgan:celeb_a64", 8, steps=2, warmup=1,
                             devices=1, input_pipeline="real")
  assert record["model"] == "dcgan:celeb_a64" and record["input"] == "real"
  assert record["flops_per_step"] > 0 and record["step_ms_median"] > 0
  with pytest.raises(Exception, match="Unknown model 'gan'"):
    bench.load_model_config("gan:celeb_a64", 8, "float32", 1)


def test_latent_configs_run_on_synthetic_latents(monkeypatch):
  """latent_dit and the full-size aliases need no autoencoder nor encoded
  latents: the step runs on synthetic moments of the latents' shape, and a
  remat row's MFU uses the FLOPs without the recomputation."""
  xl = bench.load_model_config("dit_xl2_latent", 256, "bfloat16", 1)
  assert diffusion.model_shape(xl) == (32, 32, 4)
  assert xl.data.num_classes == 1000 and xl.diffusion.conditional
  assert (xl.model.hidden_size, xl.model.depth, xl.model.patch_size) == (
      1152, 28, 2)
  b2 = bench.load_model_config("dit_b2_latent", 0, "float32", 1)
  assert b2.batch_size == 256 and diffusion.model_shape(b2) == (32, 32, 4)
  assert (b2.model.hidden_size, b2.model.depth, b2.model.num_heads) == (
      768, 12, 12)
  # Moments (mean, logvar, and the mirrored images' for random flips).
  assert aot.batch_shapes(b2, 4)["image"] == ((4, 32, 32, 16), np.float32)
  with pytest.raises(ValueError, match="multiples of 8"):  # 28 x 28 images.
    bench.load_model_config("latent_dit:fashion_mnist,full", 8, "float32", 1)

  monkeypatch.setattr(bench, "measured_cpu_peak", lambda *a, **k: 1e11)
  record = bench.bench_one("latent_dit", 8, steps=1, warmup=1, devices=1,
                           overrides=["model.remat=blocks"])
  assert record["remat"] == "blocks" and record["batch"] == 8
  # blocks recomputes each block's forward: about 4/3 of the plain step.
  ratio = record["flops_per_step"] / record["model_flops_per_step"]
  assert 1.2 < ratio < 1.4, ratio
  assert record["fraction_of_peak"] == pytest.approx(
      record["model_flops_per_step"] / record["step_ms_median"] * 1e3 / 1e11)


def test_dit_xl2_flops_per_image_are_twice_the_papers_118_6_g():
  """bench's dit_xl2_latent is DiT-XL/2 at 256 x 256 (32 x 32 x 4 latents):
  118.6 G multiply-adds a forward pass (the DiT paper's "Gflops", counted by
  fvcore, which counts multiply-adds), so 237.2 GFLOP in XLA's count; the
  train step about 3 forward passes. The analytic count is checked against
  the lowered train step (no compile) of the small latent_dit; the XL step
  lowered once gave 715.1 GFLOP per image, 3.014 x 237.2."""
  config = bench.load_model_config("dit_xl2_latent", 256, "float32", 1)
  height, width, channels = diffusion.model_shape(config)
  count = lambda c, h, w, ch: dit.dit_forward_flops(
      h, w, ch, c.model.patch_size, c.model.hidden_size, c.model.depth,
      c.model.mlp_ratio)
  assert count(config, height, width, channels) / 1e9 == pytest.approx(
      118.6, abs=0.05)
  small = bench.load_model_config("latent_dit", 8, "float32", 1)
  step = bench.flops_of(aot.lower_train_step(small, jax.devices()[:1]))
  per_forward = step / 8 / (2 * count(small, *diffusion.model_shape(small)))
  assert 3.0 < per_forward < 3.25, per_forward


def test_run_rows_for_each_remat_and_dtype_and_failures_go_on(
    tmp_path, monkeypatch, capsys):
  """A row per remat, dtype and model (remat only where the config has
  model.remat), batch 0 as the config's; an out-of-memory row is recorded
  and the rest run; rows past the time budget are skipped records."""
  calls = []

  def fake(model, batch, steps, warmup=2, dtype="float32", devices=1,
           input_pipeline="synthetic", profile_dir=None, overrides=()):
    calls.append((model, dtype, overrides))
    if model == "ddpm" and dtype == "float32" and "blocks" in str(overrides):
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory")
    record = _fake_record(model, batch or 64, steps, warmup, dtype, devices)
    record["remat"] = "".join(o.split("=")[1] for o in overrides)
    return {**record, "step_ms_min": 1.0, "step_ms_max": 1.0,
            "compile_s": 1.0}
  monkeypatch.setattr(bench, "bench_one", fake)
  out = tmp_path / "rows.jsonl"
  records = bench.run(["dcgan", "ddpm"], [0], [1], 2,
                      ["bfloat16", "float32"], "synthetic", str(out),
                      remats=["none", "blocks"])
  assert calls == [
      ("dcgan", "bfloat16", ()), ("ddpm", "bfloat16", ("model.remat=none",)),
      ("dcgan", "float32", ()), ("ddpm", "float32", ("model.remat=none",)),
      ("ddpm", "bfloat16", ("model.remat=blocks",)),
      ("ddpm", "float32", ("model.remat=blocks",))]
  assert [r["remat"] for r in records] == ["", "none", "", "none", "blocks",
                                           "blocks"]
  assert records[-1]["skipped"].startswith("out of memory: JaxRuntimeError")
  assert records[-1]["batch"] == 64  # experiments/ddpm.py's batch_size.
  assert bench.read_records(str(out)) == records
  assert "skipped: out of memory" in capsys.readouterr().out

  # Past the budget, the rows left are records that say so.
  now = [0.0]
  monkeypatch.setattr(bench, "bench_one", lambda *a, **k: (
      now.__setitem__(0, now[0] + 10), fake(*a, **k))[1])
  records = bench.run(["dcgan", "ddpm"], [16], [1], 2, "float32",
                      "synthetic", None, time_budget_s=5,
                      clock=lambda: now[0])
  assert "skipped" not in records[0]
  assert records[1]["skipped"] == "time budget of 5 s spent"
  # A bad name or override fails before anything runs.
  calls.clear()
  with pytest.raises(ValueError, match="Unknown model 'gpt'"):
    bench.run(["dcgan", "gpt"], [16], [1], 2, "float32", "synthetic", None)
  with pytest.raises(ValueError, match="model.remat"):
    bench.run(["ddpm"], [16], [1], 2, "float32", "synthetic", None,
              remats=["most"])
  assert not calls


def test_bench_cli_dtype_takes_a_list(monkeypatch, capsys):
  from genimg_jax import cli  # pylint: disable=g-import-not-at-top
  seen = []
  monkeypatch.setattr(bench, "run", lambda *a, **k: seen.append(a[4]) or [])
  monkeypatch.setattr(bench, "sweep", lambda *a, **k: seen.append(a[1]) or [])
  assert cli.main(["bench", "--model", "cnn"]) == 0
  assert cli.main(["bench", "--dtype", "bfloat16,float32"]) == 0
  assert cli.main(["bench", "--sweep"]) == 0
  assert cli.main(["bench", "--sweep", "--dtype", "bfloat16"]) == 0
  assert seen == [["float32"], ["bfloat16", "float32"],
                  ["float32", "bfloat16"], ["bfloat16"]]
  assert cli.main(["bench", "--dtype", "float16"]) == 2
  assert "Unknown dtype 'float16'" in capsys.readouterr().err
  assert cli.main(["bench", "--sweep", "--remat", "blocks"]) == 2
  assert "are for runs without --sweep" in capsys.readouterr().err


def test_topology_rows_are_compile_memory_records(tmp_path, monkeypatch,
                                                  capsys):
  """`--topology`: each row compiled for the TPU topology (`aot.run`,
  faked here: libtpu is not a test dependency) instead of timed."""
  seen = []

  def fake_run(config, topology):
    seen.append((config.model.remat, config.mesh.fsdp, topology))
    return {"argument": 2**30, "output": 2**30, "alias": 2**30,
            "temp": 3 * 2**30, "generated_code": 0, "peak_bytes": 4 * 2**30,
            "flops": 5e12, "device_kind": "TPU v5 lite", "devices": 4,
            "hosts": 1, "batch_size": config.batch_size,
            "topology": topology}
  monkeypatch.setattr(aot, "topology_devices", lambda topology: [])
  monkeypatch.setattr(aot, "run", fake_run)
  out = tmp_path / "memory.jsonl"
  records = bench.run(["dit_b2_latent"], [0], [0], 1, "float32",
                      "synthetic", str(out), overrides=["mesh.fsdp=4"],
                      remats=["none", "blocks"], topology="v5e:2x2")
  assert seen == [("none", 4, "v5e:2x2"), ("blocks", 4, "v5e:2x2")]
  assert [(r["remat"], r["fsdp"], r["batch"]) for r in records] == [
      ("none", 4, 256), ("blocks", 4, 256)]
  assert bench.read_records(str(out)) == records
  assert "peak GiB" in capsys.readouterr().out


def test_compile_memory_table_is_rendered_from_its_records():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "render_tables", os.path.join(REPO, "docs", "render_tables.py"))
  render = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(render)
  assert render.current(os.path.join(REPO, "docs", "training.md"),
                        "compile-memory-table") == (
                            render.compile_memory_table())
