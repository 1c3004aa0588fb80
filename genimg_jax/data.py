"""Image data: TFDS data sets by name, MNIST-format IDX files, sharded batches.

Every source yields the same thing: uint8 images `[N, H, W, C]` and int32
labels `[N]`. Fashion-MNIST from TFDS and from Debian's `dataset-fashion-mnist`
IDX files are the same examples in the same order.

Batches are a pure function of (seed, step): the permutation of an epoch comes
from `(seed, epoch)`, so a run resumed at step `s` sees exactly the batches an
uninterrupted run would. Each process reads only its share of the global batch,
and the shares are assembled into one global array sharded over the mesh.
Pixels travel as uint8; the train steps convert them on device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import os
import queue
import struct
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from genimg_jax import parallel

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
               0x0D: ">f4", 0x0E: ">f8"}
_IDX_PREFIX = {"train": "train", "test": "t10k"}


class DataError(ValueError):
  """Data that cannot be read or does not fit the model, with what to do."""


# ----------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST, KMNIST, ... in their original format).


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (optionally gzipped) into a numpy array."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"Cannot read IDX file {path!r}: {e}. The file is "
                    "corrupt or truncated; replace it (for Fashion-MNIST: "
                    "apt-get install --reinstall dataset-fashion-mnist).") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise DataError(f"{path!r} is not an IDX file (bad magic number "
                    f"{raw[:4].hex()!r}); expected e.g. 00000803 for images.")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"IDX file {path!r} is truncated inside its header.")
  shape = struct.unpack(f">{ndim}I", raw[4:header])
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header != expected:
    raise DataError(
        f"IDX file {path!r} is truncated or corrupt: its header promises "
        f"shape {shape} ({expected} bytes of data) but it holds "
        f"{len(raw) - header}. Replace the file.")
  return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as an IDX file (gzipped if `path` ends in .gz)."""
  array = np.ascontiguousarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(
      f">{array.ndim}I", *array.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.tobytes())


def _find_idx_file(directory: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  raise DataError(
      f"{directory!r} has no {stem}(.gz). An IDX data directory holds "
      "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
      "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz.")


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """Examples held in memory: uint8 images [N, H, W, C], int32 labels [N]."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {"image": self.images[indices], "label": self.labels[indices]}


def load_idx_split(directory: str, split: str) -> ArraySource:
  """Reads the `split` ("train" or "test") of an MNIST-format IDX directory."""
  if not os.path.isdir(directory):
    hint = (" Install it with: apt-get install dataset-fashion-mnist"
            if os.path.normpath(directory) == DEBIAN_FASHION_MNIST else "")
    raise DataError(f"IDX data directory {directory!r} does not exist.{hint}"
                    " Or set --config.data.idx_dir='' to read "
                    "--config.data.name through TFDS.")
  if split not in _IDX_PREFIX:
    raise DataError(f"IDX directories hold the splits {list(_IDX_PREFIX)}, "
                    f"not {split!r}.")
  prefix = _IDX_PREFIX[split]
  images = read_idx(_find_idx_file(directory, f"{prefix}-images-idx3-ubyte"))
  labels = read_idx(_find_idx_file(directory, f"{prefix}-labels-idx1-ubyte"))
  if images.ndim != 3 or labels.ndim != 1:
    raise DataError(f"IDX images in {directory!r} must be [N, H, W] and labels "
                    f"[N]; got {images.shape} and {labels.shape}.")
  if len(images) != len(labels):
    raise DataError(f"{directory!r}: {len(images)} {split} images but "
                    f"{len(labels)} labels. The files do not belong together.")
  return ArraySource(np.asarray(images, np.uint8)[..., None],
                     np.asarray(labels, np.int32))


# ----------------------------------------------------------------------------
# TFDS.


def default_num_workers() -> int:
  """Threads that read, decode and resize a batch: min(8, CPU count)."""
  return min(8, os.cpu_count() or 1)


_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _map_chunks(fn, items, num_workers: int) -> list:
  """`fn` over `num_workers` contiguous chunks of `items`, in order.

  `fn` maps a chunk (a slice of `items`) to a list of results, one per item;
  the lists are joined in the order of `items`, whichever chunk finishes
  first. Chunks run on a thread pool shared by every source with the same
  `num_workers` (PIL's decoders and resize release the GIL); `fn` must not
  itself submit work to that pool.
  """
  n = min(num_workers, len(items))
  if n <= 1:
    return list(fn(items))
  with _POOLS_LOCK:
    if num_workers not in _POOLS:
      _POOLS[num_workers] = concurrent.futures.ThreadPoolExecutor(
          num_workers, thread_name_prefix=f"genimg_data{num_workers}")
    pool = _POOLS[num_workers]
  bounds = np.linspace(0, len(items), n + 1).astype(int)
  chunks = [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
  return [y for ys in pool.map(fn, chunks) for y in ys]


def _reads_batches(data_source) -> bool:
  """Whether `data_source.__getitems__(keys)` reads a batch in one call.

  TFDS's ArrayRecord data sources have it (reads grouped per file, in
  parallel). Under `tfds.testing.mock_data` (tfds 4.9.10) the mocked reader's
  `__getitems__` is a partial that misses `self` and raises TypeError, so
  mocked sources are read one index at a time.
  """
  if not callable(getattr(data_source, "__getitems__", None)):
    return False
  inner = type(getattr(data_source, "data_source", None))
  return not any(c.__module__.startswith("tensorflow_datasets.testing")
                 for c in inner.__mro__)


class TfdsSource:
  """Random access to a TFDS split through `tfds.data_source` (no TensorFlow).

  `take` splits the indices into `num_workers` contiguous chunks (0: the
  default, `default_num_workers()`) and reads and decodes them on that many
  threads: one `__getitems__` call per chunk where the data source has it
  (TFDS's ArrayRecord sources do), else one `__getitem__` per index.
  """

  def __init__(self, data_source, image_key: str = "image",
               label_key: str = "label", num_workers: int = 0):
    self._source = data_source
    self._image_key = image_key
    self._label_key = label_key
    self._num_workers = num_workers or default_num_workers()
    self._batched = _reads_batches(data_source)

  def __len__(self) -> int:
    return len(self._source)

  def _read(self, keys: list[int]) -> list[dict]:
    if self._batched:
      return list(self._source.__getitems__(keys))
    return [self._source[i] for i in keys]

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    keys = [int(i) for i in indices]
    examples = _map_chunks(self._read, keys, self._num_workers)
    return {"image": np.stack([e[self._image_key] for e in examples]),
            "label": np.asarray([e.get(self._label_key, 0) for e in examples],
                                np.int32)}


def to_arrays(source) -> ArraySource:
  """Every example of a random-access source, in memory."""
  batch = source.take(np.arange(len(source)))
  return ArraySource(batch["image"].astype(np.uint8), batch["label"])


class CenterCropResize:
  """Wraps a source: the central `crop` x `crop` square of each image,
  resized to `size` (height, width) with PIL's antialiased bicubic filter.

  The DCGAN-era preprocessing of CelebA (218 x 178 -> crop 140 -> 64 x 64).
  Done on the host, so only the small images travel to the device; on
  `num_workers` threads (0: `default_num_workers()`), with the same result
  as one thread.
  """

  def __init__(self, source, crop: int, size: tuple[int, int],
               num_workers: int = 0):
    self._source = source
    self._crop = crop
    self._size = tuple(size)
    self._num_workers = num_workers or default_num_workers()

  def __len__(self) -> int:
    return len(self._source)

  def _resize(self, image_HWC: np.ndarray) -> np.ndarray:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    h, w, c = image_HWC.shape
    if h < self._crop or w < self._crop:
      raise DataError(f"data.center_crop={self._crop} is larger than the "
                      f"images ({h} x {w}); use a crop <= {min(h, w)}.")
    top, left = (h - self._crop) // 2, (w - self._crop) // 2
    square = image_HWC[top:top + self._crop, left:left + self._crop]
    pil = Image.fromarray(square[..., 0] if c == 1 else square)
    out = np.asarray(pil.resize(self._size[::-1], Image.Resampling.BICUBIC))
    return out.reshape(*self._size, c)

  def _resize_all(self, images_NHWC) -> list[np.ndarray]:
    return [self._resize(np.asarray(image, np.uint8)) for image in images_NHWC]

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    batch = self._source.take(indices)
    batch["image"] = np.stack(_map_chunks(self._resize_all, batch["image"],
                                          self._num_workers))
    return batch


def load_tfds_split(name: str, split: str, data_dir: str | None = None,
                    download: bool = False, num_workers: int = 0) -> TfdsSource:
  """Opens `split` of the TFDS data set `name` for random access, read and
  decoded on `num_workers` threads (0: `default_num_workers()`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir or None,
                           file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(
        f"Unknown TFDS data set {name!r}. Image data sets include mnist, "
        "fashion_mnist, kmnist, emnist, cifar10, cifar100, svhn_cropped, "
        "celeb_a; the full list is tfds.list_builders() and "
        "https://www.tensorflow.org/datasets/catalog.") from None
  if download:
    builder.download_and_prepare(file_format="array_record")
  try:
    return TfdsSource(builder.as_data_source(split=split),
                      num_workers=num_workers)
  except KeyError:
    offline = ("; offline, point --config.data.idx_dir at its MNIST-format "
               "IDX files" if name in IDX_DATA_SETS else
               " (IDX files hold only MNIST-format grayscale data)")
    raise DataError(
        f"TFDS data set {name!r} has no prepared {split!r} split in "
        f"{builder.data_dir!r}. Prepare it once on a machine with internet: "
        f"--config.data.download=True (or `tfds build {name} "
        f"--file_format=array_record`), and pass --config.data.tfds_data_dir "
        f"if it lives elsewhere{offline}.") from None


# TFDS data sets whose images MNIST-format IDX files can also hold.
IDX_DATA_SETS = ("mnist", "fashion_mnist", "kmnist", "emnist")


def load_split(data_config, split: str, workdir: str | None = None):
  """The `split` of the data set that `data_config` names, checked for shape.

  `data_config.name` "folder:PATH" or "arrayrecord:PATH" names your own
  images (`image_files.load_file_split`; the folder's listing is cached in
  `workdir`); otherwise `data_config.idx_dir` (if set) wins over
  `data_config.name` read via TFDS.
  Small data sets are read into memory when `data_config.in_memory` is set;
  `data_config.center_crop` > 0 crops the central square of that size and
  resizes it to `image_shape` (CelebA at 64 x 64). TFDS reads, decoding and
  resizing run on `data_config.num_workers` threads if the config has that
  field (0 or absent: `default_num_workers()`).
  """
  num_workers = data_config.get("num_workers", 0)
  from genimg_jax import image_files  # pylint: disable=g-import-not-at-top
  if image_files.is_file_source(data_config.name):
    source = image_files.load_file_split(data_config, split, workdir)
  elif data_config.idx_dir:
    source = load_idx_split(data_config.idx_dir, split)
  else:
    source = load_tfds_split(data_config.name, split,
                             data_config.tfds_data_dir, data_config.download,
                             num_workers)
  if data_config.get("center_crop", 0) and not image_files.is_file_source(
      data_config.name):  # Files: done by their ImageTransform.
    source = CenterCropResize(source, data_config.center_crop,
                              tuple(data_config.image_shape[:2]), num_workers)
  if data_config.in_memory and not isinstance(source, ArraySource) and (
      not getattr(source, "grain_pipeline", False)):
    source = to_arrays(source)
  if len(source) == 0:
    raise DataError(f"The {split} split of {data_config.name!r} is empty.")
  # In memory every example is checked; a random-access source, its first 64.
  checked = len(source) if isinstance(source, ArraySource) else min(
      len(source), 64)
  check_examples(source.take(np.arange(checked)),
                 tuple(data_config.image_shape), data_config.num_classes)
  return source


def check_examples(batch: dict[str, np.ndarray], image_shape: tuple[int, ...],
                   num_classes: int) -> None:
  """Raises DataError if images are not `image_shape` or labels out of range."""
  got = tuple(batch["image"].shape[1:])
  if got != image_shape:
    raise DataError(
        f"Images have shape {got} but the model expects {image_shape}. Set "
        f"--config.data.image_shape='{got}' and a model for that size, or use "
        "a data set of the right size.")
  labels = batch["label"]
  if num_classes and labels.size and (labels.min() < 0 or
                                      labels.max() >= num_classes):
    raise DataError(
        f"Labels range over [{labels.min()}, {labels.max()}] but the model "
        f"has {num_classes} classes (config data.num_classes).")


# ----------------------------------------------------------------------------
# Batches.

# The flip draws of a train step come from fold_in(step rng, FLIP_STREAM):
# apart from the step's other draws, its splits (split(rng, n)[i] is
# fold_in(rng, i)) and its small fold_ins ("flip" in ASCII).
FLIP_STREAM = 0x666C6970


def random_flip(images_BHWC: jax.Array, rng: jax.Array) -> jax.Array:
  """Each image mirrored left-right (the W axis) with probability 1/2, on
  device (config.data.random_flip). images: [B, H, W, C], any dtype. rng:
  the train step's rng (already folded with the step); the flips are a
  Bernoulli [B] of fold_in(rng, FLIP_STREAM) over the global batch, so each
  row's draw does not depend on the device that holds it."""
  flips_B = jax.random.bernoulli(jax.random.fold_in(rng, FLIP_STREAM), 0.5,
                                 images_BHWC.shape[:1])
  return jnp.where(flips_B[:, None, None, None], images_BHWC[:, :, ::-1],
                   images_BHWC)


def cycling_labels(n: int, num_classes: int) -> np.ndarray:
  """int32 labels [n] cycling 0, 1, ..., num_classes - 1, 0, ...: the class
  of each generated sample; all 0 for unlabelled data (num_classes 0)."""
  return np.arange(n, dtype=np.int32) % max(num_classes, 1)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Whole global batches in one pass over the data (the remainder dropped)."""
  if num_examples < global_batch:
    raise DataError(f"The data set has {num_examples} examples, fewer than "
                    f"one global batch of {global_batch}.")
  return num_examples // global_batch


def global_batch_indices(num_examples: int, global_batch: int, seed: int,
                         step: int) -> np.ndarray:
  """Indices of the global batch for `step`, shuffled per (seed, epoch)."""
  per_epoch = steps_per_epoch(num_examples, global_batch)
  epoch, position = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[position * global_batch:(position + 1) * global_batch]


def process_share(indices: np.ndarray) -> np.ndarray:
  """This process's contiguous share of a global batch's indices."""
  return np.split(indices, jax.process_count())[jax.process_index()]


def to_global_array(local: dict[str, np.ndarray], mesh: Mesh) -> dict:
  """Assembles per-process numpy slices into global arrays sharded on data."""
  sharding = parallel.data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


def _prefetch(make, steps, depth: int = 2) -> Iterator:
  """Runs `make(step)` for each step in a background thread, `depth` ahead."""
  q: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def worker():
    try:
      for step in steps:
        if stop.is_set():
          return
        q.put((step, make(step)))
    except Exception as e:  # pylint: disable=broad-except
      q.put((None, e))
    q.put((None, None))

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    while True:
      step, item = q.get()
      if step is None:
        if isinstance(item, Exception):
          raise item
        return
      yield step, item
  finally:
    stop.set()


def train_batches(source, global_batch: int, seed: int, start_step: int,
                  num_steps: int, mesh: Mesh) -> Iterator[tuple[int, dict]]:
  """Yields (step, batch) for steps [start_step, num_steps).

  `batch` holds "image" uint8 [B, H, W, C] and "label" int32 [B], global
  arrays sharded over `mesh`'s data axis. Prefetched in a thread; sources of
  image files are read, decoded and transformed by a Grain pipeline
  (`grain_train_stream`).
  """
  parallel.check_global_batch(global_batch, mesh)
  steps_per_epoch(len(source), global_batch)
  if getattr(source, "grain_pipeline", False):
    local = grain_local_batches(
        source, grain_train_stream(len(source), global_batch, seed,
                                   start_step, num_steps),
        global_batch // jax.process_count())
    return _prefetch(lambda step: to_global_array(next(local), mesh),
                     range(start_step, num_steps))

  def make(step):
    indices = global_batch_indices(len(source), global_batch, seed, step)
    return to_global_array(source.take(process_share(indices)), mesh)

  return _prefetch(make, range(start_step, num_steps))


# The random crops of image files (data.crop="random") come from
# default_rng([seed, step, row, CROP_STREAM]) ("crop" in ASCII).
CROP_STREAM = 0x63726F70


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def grain_train_stream(num_examples: int, global_batch: int, seed: int,
                       start_step: int, num_steps: int):
  """A Grain MapDataset of (example index, crop seed) for this process's
  rows of the global batches of steps [start_step, num_steps), in order.

  Element `p` is row p mod b of step p // b (b = global_batch / processes)
  of this process's share: a pure function of (seed, step, row), the same
  indices as `global_batch_indices`, so resuming at any step reads exactly
  what an uninterrupted run reads.
  """
  import grain  # pylint: disable=g-import-not-at-top
  local = global_batch // jax.process_count()
  offset = jax.process_index() * local
  per_epoch = steps_per_epoch(num_examples, global_batch)

  def element(position):
    step, row = divmod(position, local)
    epoch, batch_in_epoch = divmod(step, per_epoch)
    row += offset
    order = _epoch_order(num_examples, seed, epoch)
    return (int(order[batch_in_epoch * global_batch + row]),
            (seed, step, row, CROP_STREAM))

  return grain.MapDataset.range(start_step * local,
                                num_steps * local).map(element)


def grain_local_batches(source, stream, local_batch: int) -> Iterator[dict]:
  """This process's batches of `stream`'s (index, crop seed) elements, read
  and transformed by `source.get` on `source.num_workers` Grain threads,
  prefetched up to two batches ahead: dicts of numpy [local_batch, ...]."""
  import grain  # pylint: disable=g-import-not-at-top
  dataset = stream.map(lambda element: source.get(*element)).batch(
      local_batch, drop_remainder=True)
  options = grain.ReadOptions(num_threads=source.num_workers,
                              prefetch_buffer_size=2 * local_batch)
  return iter(dataset.to_iter_dataset(options))


def eval_batches(source, global_batch: int, mesh: Mesh) -> Iterator[dict]:
  """Yields every example once, in order; the last batch padded.

  Each batch adds "mask" float32 [B]: 1 for real examples, 0 for padding.
  """
  parallel.check_global_batch(global_batch, mesh)
  n = len(source)
  if getattr(source, "grain_pipeline", False):
    import grain  # pylint: disable=g-import-not-at-top
    num_batches = -(-n // global_batch)
    local = global_batch // jax.process_count()
    offset = jax.process_index() * local

    def element(position):  # (index, no crop seed: evaluation crops centred)
      batch, row = divmod(position, local)
      return min(batch * global_batch + offset + row, n - 1), None

    def masks(i):
      rows = np.arange(i * global_batch, (i + 1) * global_batch)
      return process_share((rows < n).astype(np.float32))

    local_batches = grain_local_batches(
        source, grain.MapDataset.range(num_batches * local).map(element),
        local)

    def make_files(i):
      return to_global_array(dict(next(local_batches), mask=masks(i)), mesh)

    for _, batch in _prefetch(make_files, range(num_batches)):
      yield batch
    return

  def make(i):
    indices = np.arange(i * global_batch, (i + 1) * global_batch)
    mask = (indices < n).astype(np.float32)
    batch = source.take(process_share(np.minimum(indices, n - 1)))
    batch["mask"] = process_share(mask)
    return to_global_array(batch, mesh)

  for _, batch in _prefetch(make, range(-(-n // global_batch))):
    yield batch


def sum_over_split(step_fn, state, source, global_batch: int, mesh: Mesh):
  """Adds up `step_fn(state, batch)`'s pytree of sums over all of `source`.

  Sums stay on device until the end: one transfer, no mean of means. Shows a
  progress bar on process 0 (the IWAE bound can take minutes).
  """
  sums = None
  batches = tqdm(eval_batches(source, global_batch, mesh), desc="eval",
                 total=-(-len(source) // global_batch), unit="batch",
                 leave=False, disable=jax.process_index() != 0)
  for batch in batches:
    out = step_fn(state, batch)
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    # One batch at a time: evaluation steps do not depend on each other, so
    # XLA:CPU may run several at once, and with several processes their
    # cross-process reductions then meet in different orders on different
    # hosts, which hangs (seen once in 3 two-process runs over 1,250 batches).
    jax.block_until_ready(sums)
  return jax.device_get(sums)
