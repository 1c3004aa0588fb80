"""Data: IDX and TFDS sources agree, batches are deterministic and sharded."""

import gzip
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from genimg_jax import data, parallel
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
  with pytest.raises(data.DataError, match="no prepared.*download=True"):
    data.load_tfds_split("mnist", "train", data_dir=str(tmp_path))


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
