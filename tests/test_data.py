"""Data: IDX and TFDS sources agree, batches are deterministic and sharded,
the train steps' random flips."""

import gzip
import os
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from genimg_jax import data, parallel, train
from conftest import write_idx_dir, tiny_config


def test_idx_roundtrip(tmp_path):
  train, test = write_idx_dir(str(tmp_path), num_train=20, num_test=7)
  got = data.load_idx_split(str(tmp_path), "train")
  np.testing.assert_array_equal(got.images, train.images)
  np.testing.assert_array_equal(got.labels, train.labels)
  assert got.images.shape == (20, 28, 28, 1) and got.images.dtype == np.uint8
  assert len(data.load_idx_split(str(tmp_path), "test")) == 7


def test_tfds_and_idx_yield_the_same_examples(tmp_path):
  with tfds.testing.mock_data(num_examples=24):
    source = data.to_arrays(data.load_tfds_split("fashion_mnist", "train"))
    # The same examples written as IDX files, as Debian ships them.
    data.write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"),
                   source.images[..., 0])
    data.write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), source.labels)
    idx = data.load_idx_split(str(tmp_path), "train")
    np.testing.assert_array_equal(idx.images, source.images)
    np.testing.assert_array_equal(idx.labels, source.labels)
    assert source.images.shape == (24, 28, 28, 1)


def test_tfds_through_load_split(tmp_path):
  config = tiny_config("")
  assert config.data.idx_dir == ""
  with tfds.testing.mock_data(num_examples=32):
    source = data.load_split(config.data, "train")
    assert len(source) == 32
    batch = source.take(np.arange(4))
    assert batch["image"].shape == (4, 28, 28, 1)
    assert batch["label"].dtype == np.int32


def test_unknown_tfds_name():
  with pytest.raises(data.DataError, match="Unknown TFDS data set"):
    data.load_tfds_split("fashion_mnisst", "train")


def test_unprepared_tfds_data_set_says_what_to_do(tmp_path):
  with pytest.raises(data.DataError, match="no prepared.*download=True.*"
                     "idx_dir at its MNIST-format"):
    data.load_tfds_split("mnist", "train", data_dir=str(tmp_path))
  # IDX files cannot hold CIFAR-10: no such advice.
  with pytest.raises(data.DataError, match="download=True") as e:
    data.load_tfds_split("cifar10", "train", data_dir=str(tmp_path))
  assert "point --config.data.idx_dir" not in str(e.value)


def test_missing_directory_says_what_to_do(monkeypatch, tmp_path):
  missing = str(tmp_path / "fashion-mnist")
  monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", missing)
  with pytest.raises(data.DataError, match="apt-get install dataset-fashion"):
    data.load_idx_split(missing, "train")
  with pytest.raises(data.DataError, match="does not exist"):
    data.load_idx_split("/nonexistent/idx", "train")


def test_wrong_magic(tmp_path):
  write_idx_dir(str(tmp_path))
  with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
    f.write(b"\x12\x34\x56\x78" + bytes(100))
  with pytest.raises(data.DataError, match="not an IDX file"):
    data.load_idx_split(str(tmp_path), "train")


def test_truncated_file(tmp_path):
  write_idx_dir(str(tmp_path))
  path = tmp_path / "train-images-idx3-ubyte.gz"
  with gzip.open(path) as f:
    raw = f.read()
  with gzip.open(path, "wb") as f:
    f.write(raw[:-100])
  with pytest.raises(data.DataError, match="truncated"):
    data.load_idx_split(str(tmp_path), "train")


def test_truncated_gzip_stream(tmp_path):
  write_idx_dir(str(tmp_path))
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(data.DataError, match="corrupt or truncated"):
    data.load_idx_split(str(tmp_path), "train")


def test_count_mismatch(tmp_path):
  write_idx_dir(str(tmp_path))
  data.write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"),
                 np.zeros(5, np.uint8))
  with pytest.raises(data.DataError, match="128 train images but 5 labels"):
    data.load_idx_split(str(tmp_path), "train")


def test_wrong_image_shape_for_model(idx_dir):
  config = tiny_config(idx_dir, **{"data.image_shape": "(32, 32, 3)"})
  with pytest.raises(data.DataError, match=r"model expects \(32, 32, 3\)"):
    data.load_split(config.data, "train")


def test_labels_out_of_range(idx_dir):
  config = tiny_config(idx_dir, **{"data.num_classes": 5})
  with pytest.raises(data.DataError, match="5 classes"):
    data.load_split(config.data, "train")


def test_batches_depend_only_on_seed_and_step():
  a = data.global_batch_indices(100, 32, seed=3, step=4)
  b = data.global_batch_indices(100, 32, seed=3, step=4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, data.global_batch_indices(100, 32, 4, 4))
  # One epoch (3 steps of 32 from 100) visits distinct examples.
  epoch = np.concatenate([data.global_batch_indices(100, 32, 3, s)
                          for s in range(3)])
  assert len(set(epoch.tolist())) == 96
  # The next epoch is a different permutation.
  assert not np.array_equal(data.global_batch_indices(100, 32, 3, 0),
                            data.global_batch_indices(100, 32, 3, 3))


def test_train_batches_are_global_sharded_arrays():
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  source = data.ArraySource(rng.integers(0, 255, (64, 4, 4, 1), np.uint8),
                            np.arange(64, dtype=np.int32))
  batches = list(data.train_batches(source, 16, seed=1, start_step=2,
                                    num_steps=5, mesh=mesh))
  assert [s for s, _ in batches] == [2, 3, 4]
  step, batch = batches[0]
  assert batch["image"].dtype == np.uint8
  assert batch["image"].shape == (16, 4, 4, 1)
  assert batch["label"].sharding == parallel.data_sharding(mesh)
  assert len(batch["label"].addressable_shards) == jax.device_count()
  np.testing.assert_array_equal(
      np.asarray(batch["label"]),
      data.global_batch_indices(64, 16, 1, step))


def test_eval_batches_cover_each_example_once():
  mesh = parallel.make_mesh()
  source = data.ArraySource(np.zeros((37, 2, 2, 1), np.uint8),
                            np.arange(37, dtype=np.int32))
  seen = []
  for batch in data.eval_batches(source, 16, mesh):
    mask = np.asarray(batch["mask"]).astype(bool)
    seen.extend(np.asarray(batch["label"])[mask].tolist())
  assert seen == list(range(37))


def test_global_batch_not_divisible_by_devices():
  mesh = parallel.make_mesh()
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    parallel.check_global_batch(12, mesh)


@pytest.mark.skipif(not os.path.isdir(data.DEBIAN_FASHION_MNIST),
                    reason="apt-get install dataset-fashion-mnist")
def test_debian_fashion_mnist():
  train = data.load_idx_split(data.DEBIAN_FASHION_MNIST, "train")
  test = data.load_idx_split(data.DEBIAN_FASHION_MNIST, "test")
  assert train.images.shape == (60000, 28, 28, 1)
  assert test.images.shape == (10000, 28, 28, 1)
  assert np.bincount(train.labels).tolist() == [6000] * 10
  assert np.bincount(test.labels).tolist() == [1000] * 10
  # The first training image is an ankle boot (class 9), as in the original.
  assert train.labels[0] == 9 and test.labels[0] == 9


class _RecordingSource:
  """A data source of example dicts that records how it is read; a chunk's
  `__getitems__` call sleeps longer the earlier its first key, so threads
  finish in the reverse of the batch order."""

  def __init__(self, num_examples: int, batched: bool):
    self.images = np.random.default_rng(0).integers(
        0, 256, (num_examples, 218, 178, 3), np.uint8)
    self.getitem_calls, self.getitems_calls = [], []
    if batched:
      self.__getitems__ = self._getitems

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    self.getitem_calls.append(i)
    return {"image": self.images[i], "label": i}

  def _getitems(self, keys):
    self.getitems_calls.append(list(keys))
    time.sleep(0.05 * (len(self.images) - keys[0]) / len(self.images))
    return [{"image": self.images[i], "label": i} for i in keys]


def test_tfds_source_reads_a_batch_per_call():
  fake = _RecordingSource(40, batched=True)
  indices = np.random.default_rng(1).permutation(40)[:24]
  batch = data.TfdsSource(fake, num_workers=1).take(indices)
  assert fake.getitems_calls == [indices.tolist()] and not fake.getitem_calls
  np.testing.assert_array_equal(batch["label"], indices)
  np.testing.assert_array_equal(batch["image"], fake.images[indices])
  # On 3 threads: 3 contiguous chunks, one call each, joined in order.
  fake.getitems_calls.clear()
  batch = data.TfdsSource(fake, num_workers=3).take(indices)
  assert sorted(fake.getitems_calls) == sorted(
      [indices[:8].tolist(), indices[8:16].tolist(), indices[16:].tolist()])
  assert not fake.getitem_calls
  np.testing.assert_array_equal(batch["label"], indices)
  np.testing.assert_array_equal(batch["image"], fake.images[indices])


def test_tfds_source_without_getitems_reads_each_index():
  fake = _RecordingSource(10, batched=False)
  batch = data.TfdsSource(fake, num_workers=4).take(np.array([7, 2, 9]))
  assert sorted(fake.getitem_calls) == [2, 7, 9]
  np.testing.assert_array_equal(batch["label"], [7, 2, 9])


def test_threaded_crop_resize_equals_one_thread():
  indices = np.random.default_rng(2).permutation(48)[:37]
  batches = []
  for workers in (1, 2, 5):
    fake = _RecordingSource(48, batched=True)
    source = data.CenterCropResize(
        data.TfdsSource(fake, num_workers=workers), 140, (64, 64), workers)
    batches.append(source.take(indices))
  # The reference: the single-threaded loop the pipeline used to run.
  expected = np.stack([source._resize(image) for image in fake.images[indices]])
  for batch in batches:
    assert batch["image"].shape == (37, 64, 64, 3)
    np.testing.assert_array_equal(batch["image"], expected)
    np.testing.assert_array_equal(batch["label"], indices)


def test_celeba_shaped_mock_data_through_load_split():
  config = tiny_config("", **{"data.name": "celeb_a", "data.center_crop": 140,
                              "data.image_shape": "(64, 64, 3)",
                              "data.num_classes": 0, "data.in_memory": False})
  with tfds.testing.mock_data(num_examples=20):
    source = data.load_split(config.data, "train")
    one = data.CenterCropResize(data.load_tfds_split("celeb_a", "train",
                                                     num_workers=1),
                                140, (64, 64), num_workers=1)
    indices = np.array([19, 3, 11, 0, 5])
    np.testing.assert_array_equal(source.take(indices)["image"],
                                  one.take(indices)["image"])


def test_cycling_labels():
  """Generated samples' classes: 0..C-1 in turn; all 0 when unlabelled."""
  labels = data.cycling_labels(7, 3)
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2, 0])
  np.testing.assert_array_equal(data.cycling_labels(4, 0), [0, 0, 0, 0])


def test_map_batches_pads_a_few_rows_to_the_devices_not_to_a_batch():
  """A few images cost a few, not a whole `batch_size` (e.g. `genimg sample
  --num 12`: 16 rows on 8 devices, not 512); more rows than a batch run in
  full batches of one shape, the last padded; every output row is fn(row)."""
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  shapes = []

  def fn(x):
    shapes.append(x.shape)
    return {"double": 2 * x, "sum": x.sum(axis=1)}

  for n, batch_size, expected in ((12, 512, [(16, 3)]), (1, 512, [(8, 3)]),
                                  (20, 16, [(16, 3), (16, 3)]),
                                  (512, 512, [(512, 3)]),
                                  (600, 512, [(512, 3), (512, 3)])):
    shapes.clear()
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    out = parallel.map_batches(fn, (x,), mesh, batch_size)
    assert shapes == expected, n
    np.testing.assert_array_equal(out["double"], 2 * x)
    np.testing.assert_array_equal(out["sum"], x.sum(axis=1))


# --- Random flips (config.data.random_flip) -----------------------------------


def _flips(rng, step, batch):
  """The rows a train step at `step` with base key `rng` mirrors, [batch]."""
  return np.asarray(jax.random.bernoulli(jax.random.fold_in(
      jax.random.fold_in(rng, step), data.FLIP_STREAM), 0.5, (batch,)))


def test_random_flip_mirrors_the_rows_its_key_selects_on_any_mesh():
  """Rows chosen by a Bernoulli [B] of fold_in(rng, FLIP_STREAM), mirrored
  along W; sharded over 8 devices the same rows flip (one draw over the
  global batch, not one per device)."""
  images = np.random.default_rng(0).integers(0, 256, (16, 4, 5, 2),
                                             dtype=np.uint8)
  rng = jax.random.key(3)
  flips = np.asarray(jax.random.bernoulli(
      jax.random.fold_in(rng, data.FLIP_STREAM), 0.5, (16,)))
  assert 0 < flips.sum() < 16
  want = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
  np.testing.assert_array_equal(data.random_flip(images, rng), want)
  mesh = parallel.make_mesh(8)
  got = jax.jit(data.random_flip)(parallel.shard_host_array(images, mesh),
                                  parallel.replicate(rng, mesh))
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("experiment,overrides", [
    ("dcgan.py", {"gan.ema_warmup": False}),
    ("ddpm.py", {"model.channels": 8, "model.multipliers": "(1,)",
                 "model.num_res_blocks": 1,
                 "model.attention_resolutions": "()",
                 "diffusion.ema_warmup": False, "diffusion.ema_decay": 0.9}),
    ("vae_mlp.py", {}),
])
def test_train_step_flips_the_rows_its_key_selects(idx_dir, experiment,
                                                    overrides):
  """With data.random_flip the step equals the step without it on the batch
  whose selected rows (`_flips`) were mirrored by hand, and differs from the
  step on the batch as it is. The GAN and diffusion configs here have no EMA
  warm-up: the step's ema_decay is the configured decay from step 0."""
  steps, configs = {}, {}
  for flip in (True, False):
    configs[flip] = tiny_config(idx_dir, experiment, **overrides, **{
        "data.random_flip": flip, "batch_size": 8})
    steps[flip] = jax.jit(train.family_module(configs[flip]).bind_train_step(
        configs[flip]))
  state = jax.device_get(train.init_state(
      configs[True], parallel.make_mesh(1), jax.random.key(0), 4))
  images = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1),
                                             dtype=np.uint8)
  labels = np.arange(8, dtype=np.int32)
  rng = jax.random.key(1)
  flips = _flips(rng, 0, 8)
  assert 0 < flips.sum() < 8
  by_hand = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
  run = lambda flip, x: jax.device_get(steps[flip](
      state, {"image": x, "label": labels}, rng))
  (flipped, m_flipped), (want, m_want), (plain, m_plain) = (
      run(True, images), run(False, by_hand), run(False, images))
  for name in m_want:
    assert float(m_flipped[name]) == pytest.approx(
        float(m_want[name]), rel=1e-5, abs=1e-6), name
  for a, b in zip(jax.tree.leaves(flipped), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The new state (a UNet's loss at init does not depend on the images:
  # its last layer starts at zero).
  assert any(not np.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(
      jax.tree.leaves(flipped), jax.tree.leaves(plain)))
  if "ema_decay" in m_want:  # 0.1 with the warm-up.
    decay = float(m_want["ema_decay"])
    ema_decay = (configs[True].gan if configs[True].family == "gan"
                 else configs[True].diffusion).ema_decay
    assert decay == pytest.approx(ema_decay, rel=1e-7)
    if configs[True].family == "diffusion":
      jax.tree.map(lambda e, p0, p: np.testing.assert_allclose(
          e, decay * p0 + (1 - decay) * p, rtol=1e-5, atol=1e-7),
                   want.ema_params, state.ema_params, want.params)
