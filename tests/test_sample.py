"""`genimg sample`: PNG grids and .npz exports for every generative family."""

import os

import numpy as np
import pytest
from PIL import Image

from genimg_jax import cli, train
from conftest import tiny_config

SHRINK = {"dcgan.py": {}, "vae_cond.py": {"vae.iw_samples": 0},
          "ddpm_cond.py": {"model.channels": 8, "model.multipliers": "(1,)",
                           "model.num_res_blocks": 1,
                           "model.attention_resolutions": "()",
                           "diffusion.sample_steps": 3}}


@pytest.mark.parametrize("experiment", sorted(SHRINK))
def test_sample_writes_png_and_npz(tmp_path, idx_dir, experiment, capsys):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(idx_dir, experiment, num_steps=2,
                                       **SHRINK[experiment]), workdir)
  capsys.readouterr()
  npz = lambda name, *extra: cli.main(
      ["sample", "--workdir", workdir, "--num", "12", "--output",
       str(tmp_path / name), *extra])
  assert npz("a.npz") == 0
  assert npz("b.npz") == 0
  assert npz("c.npz", "--seed", "1") == 0
  a, b, c = (np.load(tmp_path / f"{x}.npz") for x in "abc")
  assert a["arr_0"].shape == (12, 28, 28, 1) and a["arr_0"].dtype == np.uint8
  np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # Same seed.
  assert np.mean(a["arr_0"] != c["arr_0"]) > 0.5  # Another seed.
  if experiment == "dcgan.py":
    assert "labels" not in a
  else:  # Conditional: the labels cycle through the classes.
    np.testing.assert_array_equal(a["labels"], np.arange(12) % 10)
  assert a["arr_0"].std() > 0
  png = str(tmp_path / "grid.png")
  assert cli.main(["sample", "--workdir", workdir, "--num", "20",
                   "--output", png]) == 0
  with Image.open(png) as grid:
    assert grid.mode == "L" and grid.size == (2 * (10 * 30 + 2),
                                              2 * (2 * 30 + 2))
  if experiment == "ddpm_cond.py":
    assert npz("d.npz", "--steps", "5", "--guidance", "2") == 0
    d = np.load(tmp_path / "d.npz")["arr_0"]
    # The options reach the sampler (a 2-step model's samples are mostly
    # clipped to 0 or 255, so few pixels can change).
    assert np.any(d != a["arr_0"])
    assert npz("e.npz", "--sampler", "euler") == 2
    assert "does not fit objective 'eps'" in capsys.readouterr().err
  else:
    assert npz("e.npz", "--steps", "5") == 2
    assert "only apply to diffusion runs" in capsys.readouterr().err


def test_sample_refuses_bad_output_and_classifiers(tmp_path, idx_dir, capsys):
  assert cli.main(["sample", "--workdir", str(tmp_path), "--output",
                   str(tmp_path / "x.jpg")]) == 2
  assert "must end in .png" in capsys.readouterr().err
  assert cli.main(["sample", "--workdir", str(tmp_path), "--num", "2000",
                   "--output", str(tmp_path / "x.png")]) == 2
  assert "write more to an .npz" in capsys.readouterr().err
  workdir = str(tmp_path / "cnn")
  train.train_and_evaluate(tiny_config(idx_dir, "cnn.py", num_steps=1),
                           workdir)
  assert cli.main(["sample", "--workdir", workdir, "--output",
                   str(tmp_path / "x.npz")]) == 2
  assert "does not generate images" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "x.npz")
