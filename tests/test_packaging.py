"""A wheel built from the repo works without the source tree: configs by
name, `genimg bench` and `genimg train` from another directory."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

from conftest import REPO


def test_wheel_runs_bench_and_train_outside_the_source_tree(tmp_path,
                                                            idx_dir):
  # Built from a copy without build outputs: a stale build/ would hide
  # files the wheel does not declare.
  source = tmp_path / "source"
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
      ".venv", "build", "workdirs", "*.egg-info", ".git", "__pycache__"))
  wheels = tmp_path / "wheels"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "-w", str(wheels), str(source)], check=True, timeout=600,
                 capture_output=True)
  (wheel,) = wheels.glob("genimg_jax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  assert "genimg_jax/experiments/ddpm.py" in names
  assert "genimg_jax/nets/unet.py" in names  # The networks' package.
  assert "genimg_jax/assets/fashion_mnist_resnet.msgpack" in names
  assert not any(n.startswith(("experiments/", "tests/")) for n in names)

  # A fresh venv holding only the wheel; its dependencies come from this
  # environment's site-packages, added as a plain path (so this
  # environment's editable genimg_jax is not on it).
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                 check=True, timeout=120)
  site = subprocess.run(
      [str(venv / "bin" / "python"), "-c",
       "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      check=True, capture_output=True, text=True).stdout.strip()
  with open(os.path.join(site, "deps.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  subprocess.run([sys.executable, "-m", "pip", "--python",
                  str(venv / "bin" / "python"), "install", "-q", "--no-deps",
                  str(wheel)], check=True, timeout=300, capture_output=True)

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  genimg = str(venv / "bin" / "genimg")
  where = subprocess.run(
      [str(venv / "bin" / "python"), "-c",
       "import genimg_jax; print(genimg_jax.__file__)"], cwd=elsewhere,
      env=env, check=True, capture_output=True, text=True).stdout
  assert where.startswith(str(venv))  # The wheel's, not the source tree's.
  bench = subprocess.run(
      [genimg, "bench", "--model", "cnn", "--steps", "2", "--batch", "16",
       "--output", ""], cwd=elsewhere, env=env, capture_output=True,
      text=True, timeout=600, check=False)
  assert bench.returncode == 0, bench.stderr
  assert "cnn" in bench.stdout
  train = subprocess.run(
      [genimg, "train", "--config", "cnn:fashion_mnist", "--workdir", "run",
       f"--config.data.idx_dir={idx_dir}", "--config.batch_size=16",
       "--config.num_steps=2"], cwd=elsewhere, env=env, capture_output=True,
      text=True, timeout=600, check=False)
  assert train.returncode == 0, train.stderr
  assert "accuracy" in json.loads(train.stdout.strip().splitlines()[-1])
  assert (elsewhere / "run" / "checkpoints" / "2").is_dir()
