"""Your own images: folders of PNG/JPEG/WebP files and ArrayRecord shards.

  config.data.name = "folder:PATH"       # local or gs://
  config.data.name = "arrayrecord:PATH"  # a `genimg prepare` output directory
                                         # or a glob of .array_record files

A folder's layout decides its labels and splits:

  PATH/train/..., PATH/test/... (or val/, validation/)  the splits; else one
      pool, of which the `data.eval_fraction` of files with the smallest
      SHA-256 of their relative path is the "test" split (stable when files
      are added), the rest "train".
  SPLIT/CLASS/**/*.png  labelled: the sorted class names are 0..K-1
      (written to WORKDIR/classes.json); files directly in SPLIT/: unlabelled.

Files are ordered by relative path. The listing is built once and cached in
WORKDIR/data_files.json (a bucket of a million files is listed at the first
start only).

Every image goes through `ImageTransform`: decode, convert to RGB or L (the
channels of `data.image_shape`), resize so the short side fits (PIL's
antialiasing filters: `data.resize_filter`), crop to `data.image_shape`
(centre, or random from a per-example seed with `data.crop="random"`). Random
left-right flips stay in the train steps (`data.random_flip`).

ArrayRecord shards written by `genimg prepare` hold the files' encoded bytes
unchanged (msgpack records {"image": bytes, "label": int, "name": str}), so
`arrayrecord:` and `folder:` give the same batches.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import io
import json
import math
import os
import sys
import threading
from collections.abc import Sequence

import numpy as np

from genimg_jax import data as data_lib

DataError = data_lib.DataError
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val", "validation")}
FILE_LIST = "data_files.json"
CLASSES = "classes.json"
PREFIXES = ("folder:", "arrayrecord:")
RESIZE_FILTERS = ("bicubic", "area", "lanczos", "bilinear")
CROPS = ("center", "random")
# Shards of about this many bytes of encoded images each.
SHARD_BYTES = 256 << 20


def is_file_source(name: str) -> bool:
  """Whether data.name names a folder or ArrayRecord files."""
  return name.startswith(PREFIXES)


# ----------------------------------------------------------------------------
# Listing.


@dataclasses.dataclass(frozen=True)
class FileList:
  """The files of each split ("train", "test"), relative to `root`, with
  their labels (0 when unlabelled), and the class names ([] unlabelled)."""
  root: str
  splits: dict  # split -> list of [relative path, label]
  classes: list

  def to_json(self) -> str:
    return json.dumps({"root": self.root, "classes": self.classes,
                       "splits": self.splits})

  @classmethod
  def from_json(cls, text: str) -> "FileList":
    d = json.loads(text)
    return cls(d["root"], d["splits"], d["classes"])


def _filesystem(path: str):
  import fsspec  # pylint: disable=g-import-not-at-top
  try:
    return fsspec.core.url_to_fs(path)
  except ImportError as e:
    raise DataError(f"Cannot open {path!r}: {e}. For gs:// paths install "
                    "gcsfs: pip install 'genimg-jax[gcs]'.") from None


def _list_images(root: str) -> list[str]:
  """Relative paths of every image file under `root`, sorted."""
  fs, base = _filesystem(root)
  try:
    if not fs.isdir(base):
      raise DataError(f"Image folder {root!r} does not exist or is not a "
                      "directory. Pass --config.data.name=folder:PATH with an "
                      "existing directory.")
    found = fs.find(base)
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    hint = (" For a bucket, authenticate first (gcloud auth "
            "application-default login, or GOOGLE_APPLICATION_CREDENTIALS)."
            if "://" in root else "")
    raise DataError(f"Cannot list {root!r}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}.{hint}") from None
  base = base.rstrip("/")
  names = []
  for path in found:
    rel = path[len(base):].lstrip("/")
    if rel.lower().endswith(IMAGE_SUFFIXES) and not any(
        part.startswith(".") for part in rel.split("/")):
      names.append(rel)
  return sorted(names)


def _split_key(name: str) -> bytes:
  return hashlib.sha256(name.encode()).digest()


def held_out(names: Sequence[str], fraction: float) -> set[str]:
  """The ceil(fraction * N) names with the smallest SHA-256: a held-out set
  that does not depend on listing order and changes little as files are
  added."""
  count = math.ceil(fraction * len(names)) if fraction > 0 else 0
  return set(sorted(names, key=_split_key)[:count])


def _labelled(names: Sequence[str]) -> list[str]:
  """The sorted class names if every file lies in a sub-folder, else []."""
  if not names or any("/" not in n for n in names):
    return []
  return sorted({n.split("/", 1)[0] for n in names})


def list_folder(root: str, eval_fraction: float) -> FileList:
  """Lists the images under `root` into train and test splits (see module)."""
  names = _list_images(root)
  if not names:
    raise DataError(f"No PNG, JPEG or WebP files under {root!r}. Point "
                    "--config.data.name=folder:PATH at a folder of images.")
  top = {n.split("/", 1)[0] for n in names if "/" in n}
  split_dirs = {}
  for split, candidates in SPLIT_FOLDERS.items():
    for c in candidates:
      if c in top:
        split_dirs[split] = c
        break
  if "train" in split_dirs and "test" in split_dirs:
    by_split = {
        split: [n.split("/", 1)[1] for n in names
                if n.split("/", 1)[0] == folder]
        for split, folder in split_dirs.items()}
    prefix = {split: folder + "/" for split, folder in split_dirs.items()}
  else:
    if not 0 < eval_fraction < 1:
      raise DataError(
          f"{root!r} has no train/ and test/ (or val/) sub-folders, so a "
          "held-out split is taken from it: set --config.data.eval_fraction "
          f"between 0 and 1 (now {eval_fraction}).")
    test = held_out(names, eval_fraction)
    by_split = {"train": [n for n in names if n not in test],
                "test": [n for n in names if n in test]}
    prefix = {"train": "", "test": ""}
  classes = _labelled(by_split["train"])
  if len(classes) == 1:
    print(f"Warning: {root!r} has one class sub-folder ({classes[0]!r}): "
          "its images are used unlabelled.", file=sys.stderr)
    classes = []
  index = {c: i for i, c in enumerate(classes)}
  splits = {}
  for split, rels in by_split.items():
    if not rels:
      raise DataError(f"The {split} split of {root!r} has no images; raise "
                      "--config.data.eval_fraction or add images.")
    entries = []
    for rel in rels:
      label = 0
      if classes:
        cls = rel.split("/", 1)[0] if "/" in rel else None
        if cls not in index:
          raise DataError(
              f"{root!r}: {prefix[split] + rel!r} is not in one of the train "
              f"split's class folders {classes}. Every split needs the same "
              "class sub-folders.")
        label = index[cls]
      entries.append([prefix[split] + rel, label])
    splits[split] = entries
  return FileList(root, splits, classes)


# (root, eval_fraction) -> FileList listed by this process.
_LISTINGS: dict = {}


def cached_file_list(root: str, eval_fraction: float,
                     workdir: str | None) -> FileList:
  """`list_folder`, read from WORKDIR/data_files.json when it lists the same
  root with the same eval_fraction, else listed and written there (process
  0; atomically) with WORKDIR/classes.json."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  key = {"root": root, "eval_fraction": eval_fraction}
  path = epath.Path(workdir) / FILE_LIST if workdir else None
  if path is not None and path.exists():
    try:
      cached = json.loads(path.read_text())
      if cached.get("key") == key:
        return FileList.from_json(json.dumps(cached["list"]))
    except (ValueError, KeyError):
      pass  # A damaged cache is listed again.
  if (root, eval_fraction) in _LISTINGS:
    files = _LISTINGS[root, eval_fraction]
  else:
    files = _LISTINGS[root, eval_fraction] = list_folder(root, eval_fraction)
  if path is not None and jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (FILE_LIST + ".tmp")
    tmp.write_text(json.dumps({"key": key,
                               "list": json.loads(files.to_json())}))
    tmp.rename(path)
    write_classes(workdir, files.classes)
  return files


def write_classes(directory: str, classes: Sequence[str]) -> None:
  """Writes DIRECTORY/classes.json (local or gs://, made if missing): the
  class names as a JSON list, label k's name at index k."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CLASSES).write_text(json.dumps(classes))


# ----------------------------------------------------------------------------
# Decoding and the transform.


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """Encoded image bytes -> uint8 [H, W, C] of `image_shape`.

  Decodes with PIL, converts to "L" (C = 1) or "RGB" (C = 3; grayscale,
  palette and alpha images too), scales so that the image covers H x W with
  `resize_filter` (PIL's filters antialias when they shrink; "area" is PIL's
  BOX), rounding each side as ADM's `center_crop_arr` does, then crops H x W:
  centred, or at a random offset drawn from `crop_seed` when `crop` is
  "random". `center_crop` > 0 first keeps the central square of that side
  (data.center_crop: CelebA's 140 x 140 faces).
  """
  image_shape: tuple
  resize_filter: str = "bicubic"
  crop: str = "center"
  center_crop: int = 0

  def __call__(self, encoded: bytes, crop_seed=None, name: str = "") -> np.ndarray:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    height, width, channels = self.image_shape
    try:
      image = Image.open(io.BytesIO(encoded))
      image.load()
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptImage(name, e) from None
    mode = {1: "L", 3: "RGB"}[channels]
    if image.mode != mode:
      if image.mode in ("RGBA", "LA", "P", "PA") and mode == "RGB":
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
      image = image.convert(mode)
    w, h = image.size
    if self.center_crop:
      side = self.center_crop
      if h < side or w < side:
        raise DataError(f"data.center_crop={side} is larger than image "
                        f"{name!r} ({h} x {w}).")
      top, left = (h - side) // 2, (w - side) // 2
      image = image.crop((left, top, left + side, top + side))
      w, h = image.size
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    if size != (w, h):
      image = image.resize(size, _PIL_FILTERS[self.resize_filter]())
    w, h = image.size
    if self.crop == "random" and crop_seed is not None:
      rng = np.random.default_rng(crop_seed)
      top = int(rng.integers(0, h - height + 1))
      left = int(rng.integers(0, w - width + 1))
    else:
      top, left = (h - height) // 2, (w - width) // 2
    array = np.asarray(image.crop((left, top, left + width, top + height)),
                       np.uint8)
    return array.reshape(height, width, channels)


def _pil_filter(name):
  def get():
    from PIL import Image  # pylint: disable=g-import-not-at-top
    return getattr(Image.Resampling, name)
  return get


_PIL_FILTERS = {"bicubic": _pil_filter("BICUBIC"), "area": _pil_filter("BOX"),
                "lanczos": _pil_filter("LANCZOS"),
                "bilinear": _pil_filter("BILINEAR")}


class CorruptImage(DataError):
  """An image file that PIL cannot decode."""

  def __init__(self, name: str, error: Exception):
    self.name = name
    super().__init__(
        f"Cannot decode image {name!r} ({type(error).__name__}: {error}). "
        "Remove or replace the file, or set --config.data.skip_corrupt=True "
        "to skip such files (counted in the log).")


# ----------------------------------------------------------------------------
# Random-access sources.


class EncodedImageSource:
  """Random access to (encoded bytes, label, name) of one split, decoded
  and transformed by `ImageTransform`.

  `__getitem__(i)` and `get(i, crop_seed)` return {"image": uint8 [H, W, C],
  "label": int32}: the form of Grain's RandomAccessDataSource, read by
  `data.train_batches` and `data.eval_batches` through a Grain pipeline.
  With `skip_corrupt`, an undecodable example is replaced by the next one
  that decodes (a deterministic choice), and counted in `skipped`.
  """

  grain_pipeline = True

  def __init__(self, transform: ImageTransform, skip_corrupt: bool = False,
               num_workers: int = 0, num_classes: int = 0):
    self.transform = transform
    self.skip_corrupt = skip_corrupt
    self.num_workers = num_workers or data_lib.default_num_workers()
    self.num_classes = num_classes
    self.skipped: set[str] = set()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    raise NotImplementedError

  def read(self, index: int) -> tuple[bytes, int, str]:
    """(encoded image, label, name) of example `index`."""
    raise NotImplementedError

  def get(self, index: int, crop_seed=None) -> dict:
    n = len(self)
    for attempt in range(n):
      encoded, label, name = self.read((index + attempt) % n)
      try:
        image = self.transform(encoded, crop_seed, name)
      except CorruptImage as e:
        if not self.skip_corrupt:
          raise
        with self._lock:
          if e.name not in self.skipped:
            self.skipped.add(e.name)
            print(f"Skipped corrupt image {e.name!r} ({len(self.skipped)} "
                  "so far).", file=sys.stderr, flush=True)
        continue
      return {"image": image, "label": np.int32(label)}
    raise DataError("No image of the data set decodes.")

  def __getitem__(self, index: int) -> dict:
    return self.get(int(index))

  def take(self, indices) -> dict[str, np.ndarray]:
    """Examples `indices`, decoded on `num_workers` threads."""
    examples = data_lib._map_chunks(  # pylint: disable=protected-access
        lambda chunk: [self.get(int(i)) for i in chunk], list(indices),
        self.num_workers)
    return {"image": np.stack([e["image"] for e in examples]),
            "label": np.asarray([e["label"] for e in examples], np.int32)}


class FolderSource(EncodedImageSource):
  """One split of an image folder (local or gs://)."""

  def __init__(self, files: FileList, split: str, transform: ImageTransform,
               **kwargs):
    super().__init__(transform, **kwargs)
    self.root = files.root.rstrip("/")
    self.entries = files.splits[split]
    self.classes = files.classes
    self._fs = None

  def __len__(self) -> int:
    return len(self.entries)

  def read(self, index: int):
    name, label = self.entries[index]
    path = f"{self.root}/{name}"
    if "://" not in path:
      try:
        with open(path, "rb") as f:
          return f.read(), label, path
      except OSError as e:
        raise DataError(f"Cannot read {path!r}: {e}. The folder changed "
                        "since it was listed; delete WORKDIR/"
                        f"{FILE_LIST} to list it again.") from None
    if self._fs is None:
      self._fs = _filesystem(self.root)[0]
    return self._fs.cat_file(path), label, path


def _unpack_record(record: bytes) -> dict:
  import msgpack  # pylint: disable=g-import-not-at-top
  return msgpack.unpackb(record, raw=False)


def _pack_record(image: bytes, label: int, name: str) -> bytes:
  import msgpack  # pylint: disable=g-import-not-at-top
  return msgpack.packb({"image": image, "label": int(label), "name": name},
                       use_bin_type=True)


class ArrayRecordSource(EncodedImageSource):
  """One split of ArrayRecord shards of encoded images (`genimg prepare`),
  read through Grain's ArrayRecordDataSource; `positions` selects the
  records of the split (all when None)."""

  def __init__(self, paths: Sequence[str], transform: ImageTransform,
               classes: list, positions: Sequence[int] | None = None,
               **kwargs):
    import grain  # pylint: disable=g-import-not-at-top
    super().__init__(transform, **kwargs)
    self.paths = list(paths)
    self.records = grain.sources.ArrayRecordDataSource(self.paths)
    self.positions = (np.arange(len(self.records)) if positions is None
                      else np.asarray(positions))
    self.classes = classes

  def __len__(self) -> int:
    return len(self.positions)

  def read(self, index: int):
    record = _unpack_record(self.records[int(self.positions[index])])
    return record["image"], record["label"], record["name"]

  def names(self) -> list[str]:
    return [_unpack_record(self.records[int(p)])["name"]
            for p in self.positions]


def _shards(pattern: str) -> list[str]:
  if "://" in pattern:
    raise DataError(
        f"ArrayRecord files are read from a local path, not {pattern!r}: "
        "mount the bucket (gcsfuse, as on TPU VMs) and pass the mount's "
        "path.")
  return sorted(glob.glob(pattern))


def arrayrecord_splits(path: str, eval_fraction: float):
  """{split: (shard paths, record positions or None)} and class names of
  `arrayrecord:PATH`: a `genimg prepare` directory (train-* and test-*
  shards, classes.json) or a glob of shards (split by eval_fraction)."""
  if os.path.isdir(path):
    classes_file = os.path.join(path, CLASSES)
    classes = (json.load(open(classes_file)) if os.path.isfile(classes_file)
               else [])
    splits = {s: (_shards(os.path.join(path, f"{s}-*.array_record")), None)
              for s in ("train", "test")}
    if not splits["train"][0]:
      raise DataError(f"{path!r} holds no train-*.array_record shards; write "
                      "them with `genimg prepare --input FOLDER --output "
                      f"{path}`.")
    if splits["test"][0]:
      return splits, classes
    shards = splits["train"][0]
  else:
    shards, classes = _shards(path), []
    if not shards:
      raise DataError(f"No ArrayRecord files match {path!r}.")
  import grain  # pylint: disable=g-import-not-at-top
  names = [_unpack_record(r)["name"]
           for r in grain.sources.ArrayRecordDataSource(shards)]
  if not 0 < eval_fraction < 1:
    raise DataError(f"{path!r} has no test shards, so a held-out split is "
                    "taken from it: set --config.data.eval_fraction between "
                    f"0 and 1 (now {eval_fraction}).")
  test = held_out(names, eval_fraction)
  return {"train": (shards, [i for i, n in enumerate(names) if n not in test]),
          "test": (shards, [i for i, n in enumerate(names) if n in test])
          }, classes


# ----------------------------------------------------------------------------
# The source of a config.


def _split_name(split: str) -> str:
  if split in ("val", "validation"):
    return "test"
  if split not in ("train", "test"):
    raise DataError(f"Image folders have the splits 'train' and 'test' "
                    f"(or val), not {split!r}: set --config.data.eval_split"
                    "=test.")
  return split


def _check_classes(classes: list, num_classes: int, where: str) -> None:
  if num_classes and len(classes) != num_classes:
    found = (f"{len(classes)} class sub-folders" if classes
             else "no class sub-folders (unlabelled)")
    use = (f"--config.data.num_classes={len(classes)}" if classes
           else "a model that needs no labels")
    raise DataError(f"{where} has {found} but the config has "
                    f"data.num_classes={num_classes}. Set {use}, or "
                    "--config.data.num_classes=0 to ignore labels.")


def load_file_split(data_config, split: str, workdir: str | None = None):
  """The `split` of a `folder:` or `arrayrecord:` data set as an
  EncodedImageSource."""
  name = data_config.name
  fraction = data_config.get("eval_fraction", 0.05)
  transform = ImageTransform(tuple(data_config.image_shape),
                             data_config.get("resize_filter", "bicubic"),
                             data_config.get("crop", "center"),
                             data_config.get("center_crop", 0))
  kwargs = dict(skip_corrupt=data_config.get("skip_corrupt", False),
                num_workers=data_config.get("num_workers", 0),
                num_classes=data_config.num_classes)
  split = _split_name(split)
  if name.startswith("folder:"):
    root = name[len("folder:"):]
    files = cached_file_list(root, fraction, workdir)
    _check_classes(files.classes, data_config.num_classes, repr(root))
    return FolderSource(files, split, transform, **kwargs)
  path = name[len("arrayrecord:"):]
  splits, classes = arrayrecord_splits(path, fraction)
  _check_classes(classes, data_config.num_classes, repr(path))
  shards, positions = splits[split]
  if workdir:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
      write_classes(workdir, classes)
  return ArrayRecordSource(shards, transform, classes, positions, **kwargs)


# ----------------------------------------------------------------------------
# `genimg prepare`.


def prepare(input_folder: str, output_dir: str, eval_fraction: float = 0.05,
            num_shards: int = 0, num_workers: int = 0) -> dict:
  """Writes the images of `input_folder` as ArrayRecord shards in
  `output_dir`: SPLIT-0000K-of-0000N.array_record for the train and test
  splits (`list_folder`'s), and classes.json. The files' bytes are stored as
  they are. `num_shards` per split, 0: one per 256 MiB of images. Shards are
  written in parallel on `num_workers` threads. A gs:// output is written
  locally and then copied. Returns {split: number of images}."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  files = list_folder(input_folder, eval_fraction)
  remote = "://" in output_dir
  local_dir = tempfile.mkdtemp(prefix="genimg-prepare-") if remote else output_dir
  os.makedirs(local_dir, exist_ok=True)
  fs = _filesystem(input_folder)[0]
  root = input_folder.rstrip("/")
  workers = num_workers or data_lib.default_num_workers()
  counts = {}
  for split, entries in files.splits.items():
    if num_shards:
      shards = num_shards
    else:
      total = sum(fs.size(f"{root}/{name}") for name, _ in entries[:1000])
      total = total * len(entries) / min(len(entries), 1000)
      shards = max(1, math.ceil(total / SHARD_BYTES))
    shards = min(shards, len(entries))
    bounds = np.linspace(0, len(entries), shards + 1).astype(int)

    def write_shard(k, split=split, entries=entries, bounds=bounds,
                    shards=shards):
      path = os.path.join(local_dir,
                          f"{split}-{k:05d}-of-{shards:05d}.array_record")
      writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
      for name, label in entries[bounds[k]:bounds[k + 1]]:
        encoded = fs.cat_file(f"{root}/{name}")
        writer.write(_pack_record(encoded, label, name))
      writer.close()
      return path

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      list(pool.map(write_shard, range(shards)))
    counts[split] = len(entries)
  write_classes(local_dir, files.classes)
  if remote:
    out_fs, out_base = _filesystem(output_dir)
    out_fs.put(local_dir.rstrip("/") + "/", out_base.rstrip("/") + "/",
               recursive=True)
  return counts


# ----------------------------------------------------------------------------
# `genimg export-images`.


def export_images(data_config, output_dir: str, limit: int = 0,
                  num_workers: int = 0) -> dict:
  """Writes a config's data set as an image folder: OUTPUT/SPLIT/CLASS/N.png
  for the train split and data_config.eval_split (as "test"); CLASS is the
  label, zero-padded so that sorted names keep the label order (no class
  folders when unlabelled). `limit` > 0: the first `limit` images of each
  split. Returns {split: number of images}."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  counts = {}
  for split, folder in (("train", "train"), (data_config.eval_split, "test")):
    source = data_lib.load_split(data_config, split)
    n = min(limit, len(source)) if limit else len(source)
    digits = len(str(max(data_config.num_classes - 1, 0)))
    width = len(str(max(n - 1, 0)))

    def write(chunk, folder=folder, source=source, digits=digits,
              width=width):
      batch = source.take(np.asarray(chunk))
      for i, image, label in zip(chunk, batch["image"], batch["label"]):
        directory = os.path.join(output_dir, folder)
        if data_config.num_classes:
          directory = os.path.join(directory, f"{int(label):0{digits}d}")
        os.makedirs(directory, exist_ok=True)
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image
                        ).save(os.path.join(directory, f"{i:0{width}d}.png"))
      return [None] * len(chunk)

    chunks = [list(range(a, min(a + 1000, n))) for a in range(0, n, 1000)]
    data_lib._map_chunks(  # pylint: disable=protected-access
        lambda cs: [write(c) for c in cs], chunks,
        num_workers or data_lib.default_num_workers())
    counts[folder] = n
  return counts
