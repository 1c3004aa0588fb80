"""Your own images: folders and ArrayRecord shards through Grain."""

import json
import math
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from genimg_jax import data, image_files, parallel
from conftest import REPO


def write_image(path, array, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  image.save(path, format=fmt)


def make_folder(root, classes=("bird", "ant", "cat"), per_class=8,
                splits=False, seed=0, sizes=((40, 48), (36, 36), (60, 44))):
  """Random RGB images of mixed sizes, PNG and JPEG; labelled when
  `classes`, in train/ and test/ when `splits`."""
  rng = np.random.default_rng(seed)
  tops = ("train", "test") if splits else ("",)
  for top in tops:
    for c in classes or ("",):
      for i in range(per_class):
        h, w = sizes[i % len(sizes)]
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ext = ".png" if i % 2 else ".jpg"
        write_image(os.path.join(root, top, c, f"img{i:03d}{ext}"), array)
  return root


def data_config(name, shape=(32, 32, 3), num_classes=0, **kw):
  d = {"name": name, "idx_dir": "", "tfds_data_dir": "", "download": False,
       "in_memory": True, "eval_split": "test", "image_shape": shape,
       "num_classes": num_classes, "center_crop": 0, "num_workers": 2,
       "random_flip": False, "eval_fraction": 0.25, "resize_filter": "bicubic",
       "crop": "center", "skip_corrupt": False}
  d.update(kw)
  return ml_collections.ConfigDict(d)


def all_batches(source, global_batch, start, stop, mesh, seed=0):
  return {step: jax.tree.map(np.asarray, batch) for step, batch in
          data.train_batches(source, global_batch, seed, start, stop, mesh)}


# --- Listing ----------------------------------------------------------------


def test_class_folders_are_labels_in_sorted_order_whatever_the_listing(
    tmp_path, monkeypatch):
  root = make_folder(str(tmp_path / "f"), splits=True)
  files = image_files.list_folder(root, 0.25)
  assert files.classes == ["ant", "bird", "cat"]
  for split in ("train", "test"):
    entries = files.splits[split]
    assert len(entries) == 24
    assert all(name.startswith(f"{split}/") for name, _ in entries)
    assert [name for name, _ in entries] == sorted(n for n, _ in entries)
    assert all(files.classes[label] == name.split("/")[1]
               for name, label in entries)
  # The file system's listing order (here reversed) changes nothing.
  find = image_files._filesystem

  def reversed_find(path):
    fs, base = find(path)

    class Reversed:
      isdir = staticmethod(fs.isdir)

      @staticmethod
      def find(p):
        return list(reversed(sorted(fs.find(p))))
    return Reversed, base

  monkeypatch.setattr(image_files, "_filesystem", reversed_find)
  assert image_files.list_folder(root, 0.25) == files


def test_an_unsplit_folder_holds_out_a_stable_fraction(tmp_path):
  root = make_folder(str(tmp_path / "f"), classes=(), per_class=21)
  files = image_files.list_folder(root, 0.25)
  train = [n for n, _ in files.splits["train"]]
  test = [n for n, _ in files.splits["test"]]
  assert files.classes == [] and len(test) == math.ceil(0.25 * 21)
  assert not set(train) & set(test) and len(train) + len(test) == 21
  assert all(label == 0 for _, label in files.splits["train"])
  # Adding files moves none of the held-out ones to train.
  write_image(os.path.join(root, "new.png"), np.zeros((8, 8, 3), np.uint8))
  again = {n for n, _ in image_files.list_folder(root, 0.25).splits["test"]}
  assert len(again) == math.ceil(0.25 * 22) and len(set(test) - again) <= 1


def test_the_listing_is_cached_in_the_workdir(tmp_path, monkeypatch):
  root = make_folder(str(tmp_path / "f"), per_class=4)
  workdir = str(tmp_path / "wd")
  os.makedirs(workdir)
  image_files._LISTINGS.clear()
  first = image_files.cached_file_list(root, 0.25, workdir)
  assert json.load(open(os.path.join(workdir, "classes.json"))) == [
      "ant", "bird", "cat"]
  image_files._LISTINGS.clear()
  monkeypatch.setattr(image_files, "list_folder", None)  # Not called again.
  assert image_files.cached_file_list(root, 0.25, workdir) == first


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("empty", "No PNG, JPEG or WebP files"),
])
def test_folder_errors_say_what_to_do(tmp_path, layout, message):
  root = str(tmp_path / "f")
  if layout == "empty":
    os.makedirs(os.path.join(root, "sub"))
    open(os.path.join(root, "notes.txt"), "w").close()
  with pytest.raises(data.DataError, match=message):
    image_files.list_folder(root, 0.25)


def test_one_class_folder_is_unlabelled_with_a_warning(tmp_path, capsys):
  root = make_folder(str(tmp_path / "f"), classes=("only",), per_class=4)
  files = image_files.list_folder(root, 0.25)
  assert files.classes == [] and "one class" in capsys.readouterr().err


def test_class_count_must_match_the_config(tmp_path):
  root = make_folder(str(tmp_path / "f"), per_class=4)
  with pytest.raises(data.DataError, match="num_classes=3"):
    data.load_split(data_config("folder:" + root, num_classes=10), "train")
  # 0: labels ignored.
  source = data.load_split(data_config("folder:" + root), "train")
  assert len(source) == 9


# --- The transform ------------------------------------------------------------


def test_transform_equals_pil_by_hand():
  rng = np.random.default_rng(3)
  array = rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)
  png = _encode(array)
  # Cover 32 x 32: scale 32 / 40 -> 32 wide, 40 high; crop rows 4..36.
  for name, pil_filter in (("bicubic", Image.Resampling.BICUBIC),
                           ("area", Image.Resampling.BOX)):
    want = np.asarray(Image.fromarray(array).resize((32, 40), pil_filter))[4:36]
    got = image_files.ImageTransform((32, 32, 3), name)(png)
    np.testing.assert_array_equal(got, want)
  # Random crops: any offset along the long side, from the seed only.
  transform = image_files.ImageTransform((32, 32, 3), "bicubic", "random")
  resized = np.asarray(Image.fromarray(array).resize((32, 40),
                                                     Image.Resampling.BICUBIC))
  offsets = set()
  for seed in range(12):
    got = transform(png, (seed, 1))
    np.testing.assert_array_equal(got, transform(png, (seed, 1)))
    top = [t for t in range(9) if (resized[t:t + 32] == got).all()]
    assert len(top) == 1
    offsets.add(top[0])
  assert len(offsets) > 3


def _encode(array, fmt="PNG", mode=None):
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  image = Image.fromarray(array)
  if mode:
    image = image.convert(mode)
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def test_grayscale_alpha_and_rgb_meet_the_configured_channels():
  gray = np.full((32, 32), 77, np.uint8)
  rgba = np.zeros((32, 32, 4), np.uint8)
  rgba[..., 0] = 255
  rgba[..., 3] = 0  # Transparent: composited on white.
  rgb = image_files.ImageTransform((32, 32, 3))
  np.testing.assert_array_equal(rgb(_encode(gray)), 77)
  np.testing.assert_array_equal(rgb(_encode(rgba)), 255)
  colour = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  gray_out = image_files.ImageTransform((32, 32, 1))(_encode(colour))
  want = np.asarray(Image.fromarray(colour).convert("L"))[..., None]
  np.testing.assert_array_equal(gray_out, want)


def test_a_corrupt_image_is_named_or_skipped_and_counted(tmp_path, capsys):
  root = make_folder(str(tmp_path / "f"), classes=(), per_class=12)
  files = image_files.list_folder(root, 0.25)
  bad = files.splits["train"][2][0]
  with open(os.path.join(root, bad), "r+b") as f:
    f.truncate(40)
  source = image_files.FolderSource(files, "train",
                                    image_files.ImageTransform((32, 32, 3)))
  with pytest.raises(image_files.CorruptImage, match=bad):
    source[2]
  with pytest.raises(data.DataError, match="skip_corrupt"):
    data.load_split(data_config("folder:" + root), "train")
  skipping = image_files.FolderSource(files, "train",
                                      image_files.ImageTransform((32, 32, 3)),
                                      skip_corrupt=True)
  np.testing.assert_array_equal(skipping[2]["image"], skipping[3]["image"])
  assert skipping.skipped == {os.path.join(root, bad)}
  assert "Skipped corrupt image" in capsys.readouterr().err


# --- Batches ------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
  return make_folder(str(tmp_path_factory.mktemp("images") / "f"),
                     per_class=16)


def test_batches_equal_on_1_and_8_devices_and_across_a_resume(
    labelled_folder):
  source = data.load_split(data_config("folder:" + labelled_folder,
                                       num_classes=3), "train")
  mesh8, mesh1 = parallel.make_mesh(8), parallel.make_mesh(1)
  whole = all_batches(source, 8, 0, 6, mesh8)
  assert set(whole) == set(range(6))
  assert whole[0]["image"].shape == (8, 32, 32, 3)
  one = all_batches(source, 8, 0, 6, mesh1)
  resumed = all_batches(source, 8, 4, 6, mesh8)
  for step in range(6):
    for key in ("image", "label"):
      np.testing.assert_array_equal(one[step][key], whole[step][key])
      if step >= 4:
        np.testing.assert_array_equal(resumed[step][key], whole[step][key])
  # The images and labels are the examples of global_batch_indices.
  indices = data.global_batch_indices(len(source), 8, 0, 5)
  want = source.take(indices)
  np.testing.assert_array_equal(whole[5]["image"], want["image"])
  np.testing.assert_array_equal(whole[5]["label"], want["label"])
  # An epoch later the order differs.
  per_epoch = len(source) // 8
  later = all_batches(source, 8, per_epoch, per_epoch + 1, mesh8)
  assert not np.array_equal(later[per_epoch]["image"], whole[0]["image"])


def test_each_process_reads_its_own_share(labelled_folder, monkeypatch):
  """Two processes' streams: disjoint rows whose union, in order, is the
  global batch of each step."""
  n, global_batch = 45, 8
  shares = []
  for process in (0, 1):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    stream = data.grain_train_stream(n, global_batch, 3, 2, 9)
    shares.append([stream[i] for i in range(len(stream))])
  for step in range(2, 9):
    rows = slice((step - 2) * 4, (step - 1) * 4)
    got = [index for share in shares for index, _ in share[rows]]
    np.testing.assert_array_equal(
        got, data.global_batch_indices(n, global_batch, 3, step))
    seeds = [seed for share in shares for _, seed in share[rows]]
    assert len(set(seeds)) == 8  # Each row its own crop.


def test_eval_batches_cover_every_example_once(labelled_folder):
  source = data.load_split(data_config("folder:" + labelled_folder,
                                       num_classes=3), "test")
  batches = list(data.eval_batches(source, 8, parallel.make_mesh(8)))
  images = np.concatenate([np.asarray(b["image"]) for b in batches])
  mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
  assert mask.sum() == len(source) == 12
  np.testing.assert_array_equal(images[mask > 0],
                                source.take(np.arange(len(source)))["image"])


@pytest.mark.parametrize("splits", [True, False])
def test_prepare_then_arrayrecord_gives_the_folders_batches(tmp_path, splits):
  root = make_folder(str(tmp_path / "f"), per_class=6, splits=splits)
  out = str(tmp_path / "ar")
  counts = image_files.prepare(root, out, eval_fraction=0.25, num_shards=2)
  assert sorted(os.listdir(out)) == sorted([
      "classes.json", "train-00000-of-00002.array_record",
      "train-00001-of-00002.array_record",
      "test-00000-of-00002.array_record", "test-00001-of-00002.array_record"])
  mesh = parallel.make_mesh(8)
  sources = {}
  for split in ("test", "train"):
    sources[split] = [
        data.load_split(data_config(name, num_classes=3), split)
        for name in ("folder:" + root, "arrayrecord:" + out)]
    assert [len(s) for s in sources[split]] == [counts[split]] * 2
  a, b = (all_batches(s, 8, 0, 3, mesh) for s in sources["train"])
  for step in a:
    for key in ("image", "label"):
      np.testing.assert_array_equal(a[step][key], b[step][key])
  # A glob of shards: the same held-out split from the records' names.
  if not splits:
    glob_source = data.load_split(
        data_config("arrayrecord:" + out + "/train-*.array_record"), "test")
    assert len(glob_source) == math.ceil(0.25 * counts["train"])


def test_a_folder_in_a_bucket(bucket, tmp_path):
  from etils import epath  # pylint: disable=g-import-not-at-top
  local = make_folder(str(tmp_path / "local"), per_class=4)
  for dirpath, _, names in os.walk(local):
    for name in names:
      rel = os.path.relpath(os.path.join(dirpath, name), local)
      (epath.Path(bucket) / "images" / rel).write_bytes(
          open(os.path.join(dirpath, name), "rb").read())
  image_files._LISTINGS.clear()
  remote = data.load_split(data_config(f"folder:{bucket}/images",
                                       num_classes=3), "train")
  here = data.load_split(data_config("folder:" + local, num_classes=3),
                         "train")
  assert len(remote) == len(here) == 9
  np.testing.assert_array_equal(remote.take(np.arange(9))["image"],
                                here.take(np.arange(9))["image"])
  with pytest.raises(data.DataError, match="does not exist"):
    image_files.list_folder(f"{bucket}/missing", 0.25)
  # `genimg prepare` from and to the bucket.
  counts = image_files.prepare(f"{bucket}/images", f"{bucket}/shards",
                               eval_fraction=0.25, num_shards=1)
  assert counts == {"train": 9, "test": 3}
  assert sorted(p.name for p in (epath.Path(bucket) / "shards").iterdir()) == [
      "classes.json", "test-00000-of-00001.array_record",
      "train-00000-of-00001.array_record"]


from test_bucket import bucket  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position


# --- From the command line ------------------------------------------------------


def random_inception(path):
  """A random-weights FID Inception file, as `genimg convert-inception`
  writes one (no torch needed)."""
  import flax.serialization  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from genimg_jax import inception, quality  # pylint: disable=g-import-not-at-top
  variables = jax.jit(inception.FIDInceptionV3().init)(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
  # He-scaled kernels: with Flax's default (LeCun) scale the activations
  # shrink through the 94 ReLU layers until every image has the same features.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, x: x * np.sqrt(2.0) if "kernel" in jax.tree_util.keystr(
          path) else x, variables)
  with open(path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(
        jax.tree.map(np.asarray, variables)))
  with open(path + ".json", "w") as f:
    json.dump({"network": "fid_inception_v3", "sha256":
               quality.file_sha256(path)}, f)
  return path


def run_cli(*args, cwd):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.run([sys.executable, "-m", "genimg_jax.cli", *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=900)


TINY = {
    "dcgan:cifar10": [],
    "vae_conv:cifar10": ["vae.latent_dim=8", "vae.iw_samples=2"],
    "flow:cifar10": ["model.channels=8", "model.multipliers=(1,2)",
                     "model.attention_resolutions=()",
                     "model.num_res_blocks=1", "diffusion.sample_steps=2"],
}


def test_gan_vae_and_flow_train_and_evaluate_on_a_folder_from_the_cli(
    tmp_path):
  """32 x 32 RGB images of mixed sizes and formats, 3 classes, one of them
  grayscale: each family trains 3 steps from the command line and measures
  FID against the held-out split with an Inception network."""
  root = make_folder(str(tmp_path / "images"), per_class=12,
                     sizes=((40, 48), (32, 32), (50, 36)))
  write_image(os.path.join(root, "ant", "gray.png"),
              np.full((34, 34, 1), 90, np.uint8))
  inception_file = random_inception(str(tmp_path / "inception.msgpack"))
  common = ["--config.data.name=folder:" + root, "--config.data.num_classes=0",
            "--config.batch_size=8", "--config.eval_batch_size=8",
            "--config.num_steps=3", "--config.eval_every=0",
            "--config.checkpoint_every=3", "--config.log_every=1",
            "--config.eval_samples=16", "--config.data.eval_fraction=0.2",
            "--config.feature_network=inception:" + inception_file]
  for experiment, extra in TINY.items():
    workdir = str(tmp_path / experiment.split(":")[0])
    result = run_cli("train", "--config", experiment, "--workdir", workdir,
                     *common, *(f"--config.{o}" for o in extra), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 < metrics["fid"] < 1e6 and metrics["inception_score"] >= 1
    assert os.path.isfile(os.path.join(workdir, "data_files.json"))
    listing = json.load(open(os.path.join(workdir, "data_files.json")))
    assert len(listing["list"]["splits"]["test"]) == math.ceil(0.2 * 37)
  # `genimg eval` reads the workdir's listing and measures again.
  result = run_cli("eval", "--workdir", workdir, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 3


def test_a_config_outside_the_repository_builds_on_the_packaged_ones(
    tmp_path):
  from genimg_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  path = tmp_path / "elsewhere" / "faces.py"
  path.parent.mkdir()
  path.write_text(
      "from genimg_jax.experiments import common, ddpm\n\n"
      "def get_config(arg=''):\n"
      "  config = ddpm.get_config(arg)\n"
      "  config.data.name = 'folder:/data/faces'\n"
      "  config.data.image_shape = (64, 64, 3)\n"
      "  config.data.num_classes = 0\n"
      "  assert common.VARIANTS\n"
      "  return config\n")
  config = config_lib.load_config_file(str(path) + ":fashion_mnist,full")
  config_lib.validate(config)
  assert config.data.name == "folder:/data/faces"
  assert config.model.channels == 64  # ddpm's full variant.


def test_no_fid_when_the_feature_network_does_not_fit(capsys):
  from genimg_jax import config as config_lib, train  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file("dcgan")
  assert train.without_unfit_fid(config) is config  # 28 x 28 x 1 fits.
  config = config_lib.apply_overrides(config, [
      "data.name=folder:/x", "data.image_shape=32,32,3"])
  quiet = train.without_unfit_fid(config)
  assert quiet.eval_samples == 0 and config.eval_samples == 10000
  out = capsys.readouterr().out
  assert out.count("\n") == 1 and "Training without FID" in out
  assert "inception:FILE" in out
