"""The peer benchmark: genimg-jax's train steps next to PyTorch and Keras.

  python benchmarks/run.py --out /tmp/peers [--rounds 3 --models cnn,dcgan,vae
      --batch 128 --frameworks genimg-jax,torch-eager,...]
  python benchmarks/run.py --table /tmp/peers/peers.jsonl   # the table again

Round after round, each model runs with every framework, one process after
another (never two at once), the frameworks' order rotated each round
(harness.schedule). Before each run the machine must go quiet (harness.
wait_idle); each record carries the other processes' load during its timed
loop (other_load_cores, peers) and over the whole run (other_load_cores_run).
The peers run in their own virtualenvs (--torch-python, --tf-python; made
from requirements-torch.txt / requirements-tf.txt the first time), genimg-jax
with this Python (`genimg bench`, 2 CPU devices). Records go to
OUT/peers.jsonl; the table (median and range over rounds, and per-round
ratios peer ms / genimg-jax ms) is printed at the end.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import shapes  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS = {"cnn": 50, "dcgan": 20, "vae": 40}  # About 4 s of timed steps each.
VENVS = {"torch": ("/tmp/peers-torch", "requirements-torch.txt"),
         "tf": ("/tmp/peers-tf", "requirements-tf.txt")}


def command(framework: str, model: str, batch: int, steps: int,
            pythons: dict, output: str) -> list[str]:
  """The command line of one run."""
  if framework == harness.GENIMG:
    return [pythons["genimg"], "-m", "genimg_jax.cli", "bench", "--model",
            model, "--batch", str(batch), "--steps", str(steps), "--output",
            output]
  lib, variant = framework.split("-", 1)
  script = "peer_torch.py" if lib == "torch" else "peer_keras.py"
  flag = {"compile": ["--compile"], "keras-xla": ["--xla"]}.get(variant, [])
  return [pythons[lib], os.path.join(HERE, script), "--model", model,
          "--batch", str(batch), "--steps", str(steps), "--warmup", "5",
          *flag]


def _commit() -> str:
  """genimg-jax's git commit (with "+changes" for a dirty tree), or ""."""
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain",
                            "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return ""
  return head.strip() + ("+changes" if dirty.strip() else "")


def run_one(framework, model, batch, steps, pythons, log) -> dict:
  """Runs one benchmark process; its record, with the run's other load."""
  with tempfile.TemporaryDirectory() as tmp:
    output = os.path.join(tmp, "bench.jsonl")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tmp,  # Cold inductor.
               PYTHONWARNINGS="ignore")
    waited = harness.wait_idle()
    b0, c0, w0 = harness.busy_s(), harness.own_s(children=True), time.time()
    proc = subprocess.run(command(framework, model, batch, steps, pythons,
                                  output),
                          cwd=REPO if framework == harness.GENIMG else HERE,
                          env=env,
                          capture_output=True, text=True, check=False)
    wall = time.time() - w0
    other = ((harness.busy_s() - b0) -
             (harness.own_s(children=True) - c0)) / wall
    log.write(f"== {framework} {model} batch {batch}\n{proc.stderr}\n")
    lines = (open(output).read() if framework == harness.GENIMG and
             os.path.exists(output) else proc.stdout).strip().splitlines()
  if proc.returncode or not lines:
    return {"framework": framework, "model": model, "batch": batch,
            "error": f"exit {proc.returncode}, see peers.log"}
  record = json.loads(lines[-1])
  if framework == harness.GENIMG:
    record["params_match"] = None  # genimg's own nets define the shapes.
    record["waited_idle_s"] = waited
  record.update(framework=framework, other_load_cores_run=round(
      max(other, 0.0), 2), expected_params=shapes.param_count(model),
                host_cpu=harness.host_cpu(), genimg_commit=_commit())
  return record


def ensure_venv(lib: str, python: str) -> str:
  """`python`, or a virtualenv made from requirements-LIB.txt."""
  if python:  # Absolute: the peers run in benchmarks/.
    return os.path.abspath(python) if os.sep in python else python
  venv, requirements = VENVS[lib]
  if not os.path.exists(os.path.join(venv, "bin", "python")):
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "-r",
                    os.path.join(HERE, requirements)], check=True)
  return os.path.join(venv, "bin", "python")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="/tmp/peers")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--models", default="cnn,dcgan,vae")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=0,
                      help="timed steps (default: cnn 50, dcgan 20, vae 40)")
  parser.add_argument("--frameworks",
                      default=",".join((harness.GENIMG,) + harness.PEERS))
  parser.add_argument("--torch-python", default="",
                      help="a Python with torch (default: a venv in /tmp)")
  parser.add_argument("--tf-python", default="",
                      help="a Python with tensorflow (default: a venv in "
                           "/tmp)")
  parser.add_argument("--table", default="",
                      help="FILE.jsonl: print its table and exit")
  args = parser.parse_args(argv)
  if args.table:
    with open(args.table) as f:
      records = [json.loads(line) for line in f if line.strip()]
    print(harness.markdown_table(harness.summarize(records)))
    return 0
  if args.rounds < 3:
    parser.error("--rounds must be at least 3 (a median and a range)")
  frameworks = args.frameworks.split(",")
  pythons = {"genimg": sys.executable}
  if any(f.startswith("torch") for f in frameworks):
    pythons["torch"] = ensure_venv("torch", args.torch_python)
  if any(f.startswith("tf") for f in frameworks):
    pythons["tf"] = ensure_venv("tf", args.tf_python)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "peers.jsonl")
  records = []
  with open(path, "w") as out, open(os.path.join(args.out, "peers.log"),
                                    "w") as log:
    for rnd, model, fw in harness.schedule(args.models.split(","), frameworks,
                                           args.rounds):
      record = dict(run_one(fw, model, args.batch,
                            args.steps or STEPS[model], pythons, log),
                    round=rnd)
      records.append(record)
      out.write(json.dumps(record) + "\n")
      out.flush()
      print(f"round {rnd} {model} {fw}: "
            f"{record.get('step_ms_median', record.get('error'))}",
            flush=True)
  print(harness.markdown_table(harness.summarize(records)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
