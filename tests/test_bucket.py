"""Bucket workdirs: a gs:// workdir on a local GCS emulator (no network).

gcsfs (through etils.epath) and orbax's tensorstore both talk to the
emulator, so every file of the run (checkpoints, config, metrics, TensorBoard
events, samples, eval.json, the lock object) goes through the GCS API.
"""

import json
import os
import socket

import numpy as np
import pytest
from etils import epath

from genimg_jax import checkpoint, train
from conftest import tiny_config

emulator = pytest.importorskip("gcp_storage_emulator.server")
emulator_objects = pytest.importorskip("gcp_storage_emulator.handlers.objects")
pytest.importorskip("gcsfs")


def _with_generation_header(download):
  """The emulator's download handler, also sending the object's generation
  as GCS does (x-goog-generation): tensorstore reads it (orbax's OCDBT
  manifest writes are conditional on it)."""
  def handler(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"],
                                 request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
    except Exception:  # pylint: disable=broad-except
      pass  # The handler itself answers 404.
    return download(request, response, storage, *args, **kwargs)
  return handler


@pytest.fixture
def bucket(monkeypatch, tmp_path):
  """gs://bucket served by an in-memory emulator; cwd is an empty dir."""
  monkeypatch.setattr(emulator_objects, "download",  # get(alt=media) too.
                      _with_generation_header(emulator_objects.download))
  monkeypatch.setattr(emulator, "HANDLERS", tuple(
      (regex, {method: emulator_objects.download if fn.__name__ == "download"
               else fn for method, fn in methods.items()})
      for regex, methods in emulator.HANDLERS))
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  server = emulator.create_server("localhost", port, in_memory=True,
                                  default_bucket="bucket")
  server.start()
  url = f"http://localhost:{port}"
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # orbax's tensorstore
  monkeypatch.chdir(tmp_path)
  yield "gs://bucket"
  server.stop()


def test_a_run_in_a_bucket_trains_resumes_and_evaluates(bucket, idx_dir,
                                                        tmp_path):
  workdir = f"{bucket}/runs/dcgan"
  config = tiny_config(idx_dir, "dcgan.py", num_steps=4, eval_every=4,
                       log_every=2, checkpoint_every=2, eval_samples=64)
  state, metrics = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 4
  root = epath.Path(workdir)
  names = {p.name for p in root.iterdir()}
  assert {"checkpoints", "checkpoints_best", "config.json", "metrics.jsonl",
          "samples", "eval.json"} <= names, names
  assert any(n.startswith("events.out.tfevents") for n in names), names
  assert ".lock" not in names  # Deleted at exit.
  assert json.loads((root / "eval.json").read_text())["step"] == 4
  assert [p.name for p in (root / "checkpoints_best").iterdir()] == ["4"]
  assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["2", "4"]
  assert (root / "samples" / "step_000004.png").read_bytes()[:4] == (
      b"\x89PNG")
  # Nothing was written to a local path named after the URL.
  assert not os.path.exists(tmp_path / "gs:"), os.listdir(tmp_path)

  # Resumes from the bucket's checkpoint 4 and appends to its metrics.
  config = tiny_config(idx_dir, "dcgan.py", num_steps=6, eval_every=6,
                       log_every=2, checkpoint_every=2, eval_samples=64)
  state, _ = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 6
  rows = [json.loads(line) for line in
          (root / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in rows if r["split"] == "train"]
  assert train_steps == [1, 2, 3, 4, 5, 6]
  assert json.loads((root / "eval.json").read_text())["step"] == 6

  # `genimg eval` restores from the bucket; same parameters as trained.
  _, _, restored = train.restore_workdir(workdir)
  np.testing.assert_array_equal(
      np.asarray(restored.step), np.asarray(state.step))
  evaluated = train.evaluate_workdir(workdir, which="best")
  assert evaluated["step"] in (4, 6) and evaluated["fid"] > 0


def test_the_lock_object_of_a_live_run_elsewhere_stops_a_second_run(bucket):
  workdir = f"{bucket}/runs/locked"
  checkpoint.check_writable(workdir)
  lock = epath.Path(workdir) / ".lock"
  lock.write_text(json.dumps({"host": "other-vm", "pid": 1, "time": 0,
                              "token": "x"}))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"host other-vm.*gcloud storage rm"):
    with checkpoint.WorkdirLock(workdir):
      pass
  # A dead process of this host (a run killed by SIGKILL): taken over.
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1,
                              "time": 0, "token": "x"}))
  with checkpoint.WorkdirLock(workdir):
    holder = json.loads(lock.read_text())
    assert holder["pid"] == os.getpid() and holder["token"] != "x"
    with pytest.raises(checkpoint.CheckpointError, match="Another run"):
      with checkpoint.WorkdirLock(workdir):
        pass
  assert not lock.exists()
  # This host and this very pid, not held by this process: a container whose
  # trainer is PID 1 again after a SIGKILL (or the watchdog's os._exit).
  lock.write_text(json.dumps({"host": socket.gethostname(),
                              "pid": os.getpid(), "time": 0, "token": "x"}))
  with checkpoint.WorkdirLock(workdir):
    assert json.loads(lock.read_text())["token"] != "x"
  assert not lock.exists()
