"""Timing, interleaving and summaries of the peer benchmark (stdlib only,
imported by run.py and by the peer scripts in their own virtualenvs).

`time_steps` times a step function after waiting for the machine to go
quiet and reports the load of other processes during the timed loop;
`schedule` interleaves genimg-jax with the peers, round after round;
`summarize` and `markdown_table` turn the records into medians, ranges and
per-round ratios.
"""

import os
import platform
import statistics
import time

_TICKS = os.sysconf("SC_CLK_TCK")
GENIMG = "genimg-jax"
PEERS = ("torch-eager", "torch-compile", "tf-keras-graph", "tf-keras-xla")
DISTURBED_CORES = 0.1  # Other processes' load above this: a disturbed run.


def busy_s() -> float:
  """CPU seconds the whole machine has been busy (not idle, not iowait)."""
  with open("/proc/stat") as f:
    ticks = [int(x) for x in f.readline().split()[1:]]
  return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICKS


def own_s(children: bool = False) -> float:
  """CPU seconds of this process (or of its finished children)."""
  t = os.times()
  return t.children_user + t.children_system if children else t.user + t.system


def wait_idle(max_s: float = float(os.environ.get("BENCH_WAIT_IDLE_S", 600)),
              threshold_cores: float = 0.2) -> float:
  """Waits (at most max_s) until other processes use < threshold_cores over
  a second; returns the seconds waited."""
  start = time.perf_counter()
  while time.perf_counter() - start < max_s:
    b0, o0 = busy_s(), own_s()
    time.sleep(1.0)
    if (busy_s() - b0) - (own_s() - o0) < threshold_cores:
      break
  return round(time.perf_counter() - start, 1)


def time_steps(step, batch: int, steps: int, warmup: int) -> dict:
  """Times step() (which must block on its result): the first call as
  compile_s, `warmup` untimed calls, then `steps` timed ones."""
  waited = wait_idle()
  t0 = time.perf_counter()
  step()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    step()
  b0, o0, w0 = busy_s(), own_s(), time.perf_counter()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  wall = time.perf_counter() - w0
  other = ((busy_s() - b0) - (own_s() - o0)) / wall
  median = statistics.median(times)
  return {"batch": batch, "compile_s": round(compile_s, 3),
          "step_ms_median": round(median * 1e3, 3),
          "step_ms_min": round(min(times) * 1e3, 3),
          "images_per_s": round(batch / median, 1), "steps": steps,
          "warmup": warmup, "other_load_cores": round(max(other, 0.0), 2),
          "waited_idle_s": waited}


def schedule(models, frameworks, rounds: int) -> list[tuple[int, str, str]]:
  """(round, model, framework) in run order: each round runs every model
  with every framework, one after another, the frameworks' order rotated by
  one each round so that none always runs first (or right after another)."""
  order = []
  for r in range(rounds):
    shift = r % len(frameworks)
    rotated = list(frameworks[shift:]) + list(frameworks[:shift])
    order += [(r, model, fw) for model in models for fw in rotated]
  return order


def host_cpu() -> str:
  """The CPU's model name (/proc/cpuinfo) and the cores this process may
  use, e.g. "Intel(R) Xeon(R) Processor, 2 cores"."""
  name = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f
               if line.startswith("model name")]
    name = names[0] if names else name
  except OSError:
    pass
  return f"{name}, {len(os.sched_getaffinity(0))} cores"


def _spread(values) -> dict:
  return {"median": statistics.median(values), "min": min(values),
          "max": max(values), "n": len(values)}


def summarize(records: list[dict], baseline: str = GENIMG) -> dict:
  """{(model, framework): {"ms": spread of step_ms_median over rounds,
  "ratio": spread of framework ms / baseline ms of the same round and model
  (above 1: the baseline is faster), "disturbed": runs whose other load
  exceeded DISTURBED_CORES}}. Records with "error" are left out."""
  ok = [r for r in records if "error" not in r]
  base = {(r["round"], r["model"]): r["step_ms_median"] for r in ok
          if r["framework"] == baseline}
  out = {}
  for key in sorted({(r["model"], r["framework"]) for r in ok}):
    rs = [r for r in ok if (r["model"], r["framework"]) == key]
    ratios = [r["step_ms_median"] / base[(r["round"], r["model"])]
              for r in rs if (r["round"], r["model"]) in base]
    out[key] = {"ms": _spread([r["step_ms_median"] for r in rs]),
                "ratio": _spread(ratios) if ratios else None,
                "disturbed": sum(max(r.get("other_load_cores", 0),
                                     r.get("other_load_cores_run", 0)) >
                                 DISTURBED_CORES for r in rs)}
  return out


def markdown_table(summary: dict, frameworks=(GENIMG,) + PEERS) -> str:
  """Step ms (median, min-max over rounds) per model and framework, then
  each peer's ratio to genimg-jax (median, min-max of the per-round
  ratios)."""
  models = sorted({m for m, _ in summary})
  fws = [f for f in frameworks if any((m, f) in summary for m in models)]
  peers = [f for f in fws if f != GENIMG]
  lines = ["| model | " + " | ".join(f"{f} ms" for f in fws) + " | " +
           " | ".join(f"{f} / {GENIMG}" for f in peers) + " |",
           "|" + " --- |" * (1 + len(fws) + len(peers))]
  for m in models:
    cells = []
    for f in fws:
      s = summary.get((m, f))
      cells.append(f"{s['ms']['median']:.0f} ({s['ms']['min']:.0f}-"
                   f"{s['ms']['max']:.0f})" if s else "-")
    for f in peers:
      s = summary.get((m, f), {}).get("ratio")
      cells.append(f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"
                   if s else "-")
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  runs = sum(s["ms"]["n"] for s in summary.values())
  disturbed = sum(s["disturbed"] for s in summary.values())
  lines.append("")
  lines.append(f"{runs} runs, {disturbed} of them disturbed (other "
               f"processes above {DISTURBED_CORES} cores).")
  return "\n".join(lines)
