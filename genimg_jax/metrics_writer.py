"""Metric logging: TensorBoard event files (tensorboardX) and JSON lines.

TensorBoard gets the scalars (SCALARS), the sample grids (IMAGES) and the
run's configuration (HPARAMS: each flattened config field, so runs can be
compared by their settings against their eval/* metrics). Only process 0
writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import os

import jax


class MetricWriter:
  """Writes scalars to `workdir` as TensorBoard events and metrics.jsonl."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(logdir=workdir)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

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
    from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top
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
