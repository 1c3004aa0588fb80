"""Metric logging: TensorBoard event files (tensorboardX) and JSON lines.

TensorBoard gets the scalars (SCALARS), the sample grids (IMAGES) and the
run's configuration (HPARAMS: each flattened config field, so runs can be
compared by their settings against their eval/* metrics). Only process 0
writes; other processes get a writer that does nothing.

A URL workdir (gs://...) gets both files through `etils.epath`; object
stores cannot append, so each file is uploaded whole at most once a minute,
and at flush and close.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import jax
from etils import epath

from genimg_jax import checkpoint

UPLOAD_EVERY_S = 60.0


class ObjectAppender:
  """An append-only file at a URL: the bytes are kept and the object is
  rewritten whole (at most every `UPLOAD_EVERY_S`, at flush and close).
  Continues an object that exists (a resumed run's metrics.jsonl)."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._data = bytearray(self._path.read_bytes() if self._path.exists()
                           else b"")
    self._dirty = False
    self._uploaded_at = time.monotonic()

  def write(self, data) -> None:
    self._data += data.encode() if isinstance(data, str) else data
    self._dirty = True
    if time.monotonic() - self._uploaded_at > UPLOAD_EVERY_S:
      self.flush()

  def flush(self) -> None:
    if self._dirty:
      self._path.write_bytes(bytes(self._data))
      self._dirty = False
      self._uploaded_at = time.monotonic()

  def close(self) -> None:
    self.flush()


class _ObjectRecordWriterFactory:
  """tensorboardX's hook for event files at URLs, through epath."""

  def open(self, path):
    return ObjectAppender(path)

  def directory_check(self, path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _torch_hidden():
  """Hides PyTorch from imports inside the block, unless already imported.

  tensorboardX imports torch when it is installed (2-3 s of start-up), only
  to recognise torch tensors, which genimg never logs. A `None` entry in
  `sys.modules` makes `import torch` raise ImportError; it is removed after,
  so the process can still import torch itself.
  """
  if "torch" in sys.modules:
    yield
    return
  sys.modules["torch"] = None
  try:
    yield
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]


def _import_tensorboardx():
  """tensorboardX's SummaryWriter, record_writer and hparams."""
  with _torch_hidden():
    from tensorboardX import SummaryWriter, record_writer  # pylint: disable=g-import-not-at-top
    from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top
  return SummaryWriter, record_writer, hparams


class MetricWriter:
  """Writes scalars to `workdir` as TensorBoard events and metrics.jsonl."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    SummaryWriter, record_writer, _ = _import_tensorboardx()
    jsonl = checkpoint.workdir_path(workdir, "metrics.jsonl")
    if checkpoint.is_url(workdir):
      record_writer.register_writer_factory(workdir.split("://")[0],
                                            _ObjectRecordWriterFactory())
      self._jsonl = ObjectAppender(jsonl)
    else:
      self._jsonl = open(jsonl, "a")
    self._tb = SummaryWriter(logdir=workdir)

  def write(self, step: int, scalars: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for name, value in scalars.items():
      self._tb.add_scalar(f"{prefix}/{name}", value, step)
    self._jsonl.write(json.dumps({"step": step, "split": prefix, **scalars})
                      + "\n")

  def write_images(self, step: int, images: dict,
                   prefix: str = "samples") -> None:
    """Writes {name: uint8 image [H, W, C]} as TensorBoard images."""
    if not self.enabled:
      return
    for name, image in images.items():
      self._tb.add_image(f"{prefix}/{name}", image, step, dataformats="HWC")

  def write_hparams(self, config) -> None:
    """Writes the flattened `config` (ConfigDict) as the run's hyperparameters;
    sequences become strings."""
    if not self.enabled:
      return
    _, _, hparams = _import_tensorboardx()
    flat = {}
    def visit(node, prefix):
      for key, value in node.items():
        if hasattr(value, "items"):
          visit(value, f"{prefix}{key}.")
        elif isinstance(value, (bool, int, float, str)):
          flat[prefix + key] = value
        else:
          flat[prefix + key] = str(value)
    visit(config, "")
    # The session-start record only: TensorBoard then lists every scalar tag
    # (eval/fid, ...) as a metric of the run.
    _, session_start, _ = hparams(flat, {})
    self._tb.file_writer.add_summary(session_start)

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
