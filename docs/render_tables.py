"""Renders the docs' measured tables from the JSON lines they come from.

  python docs/render_tables.py loader   # docs/loader_bench.jsonl -> docs/data.md
  python docs/render_tables.py compile  # docs/compile_memory.jsonl -> docs/training.md
"""

import json
import os
import statistics
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))


def replace_between(path: str, marker: str, body: str) -> None:
  """Replaces the text between <!-- marker --> and <!-- /marker -->."""
  with open(path) as f:
    text = f.read()
  start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
  head = text.split(start)[0]
  tail = text.split(end)[1] if end in text else "\n"
  with open(path, "w") as f:
    f.write(f"{head}{start}\n{body}\n{end}{tail}")


def current(path: str, marker: str) -> str:
  """The text between <!-- marker --> and <!-- /marker --> in `path`."""
  with open(path) as f:
    text = f.read()
  return text.split(f"<!-- {marker} -->\n")[1].split(f"\n<!-- /{marker} -->")[0]


def loader_table() -> str:
  with open(os.path.join(DOCS, "loader_bench.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  groups = {}
  for r in records:
    source = next((o.split("=", 1)[1] for o in r["overrides"]
                   if o.startswith("data.name=")), "?")
    key = (os.path.basename(source.rstrip("/")), r["model"], r["batch"],
           r.get("device_kind", ""), r.get("jax_version", ""))
    groups.setdefault(key, []).append(r)
  lines = ["| images | model | batch | runs | loader alone, images/s | "
           "loader + step, images/s | loader / step |",
           "|---|---|---|---|---|---|---|"]
  for (source, model, batch, _, _), rs in sorted(groups.items()):
    loader = [r["loader_images_per_s"] for r in rs]
    step = [r["images_per_s"] for r in rs]
    lines.append(
        f"| {source} | {model} | {batch} | {len(rs)} | "
        f"{statistics.median(loader):.0f} ({min(loader):.0f}-{max(loader):.0f})"
        f" | {statistics.median(step):.0f} ({min(step):.0f}-{max(step):.0f})"
        f" | {statistics.median(loader) / statistics.median(step):.1f} |")
  r = records[-1]
  loads = [x["load_avg_1m"] for x in records if "load_avg_1m" in x]
  lines.append("")
  lines.append(f"Medians (range) of the runs; {r.get('device_kind')} "
               f"({r.get('platform')}), {r.get('host_cpus', '?')} CPU cores "
               f"(1-minute load average {min(loads):.1f}-{max(loads):.1f} "
               "during the runs: other jobs shared the cores), "
               f"jax {r.get('jax_version', '?')}; command: `bash "
               "experiments/loader_bench.sh`. jpeg64 and jpeg256: 2,000 "
               "smooth random JPEGs (quality 90) of 64 x 64 and 256 x 256, "
               "read, decoded and resized to 64 x 64 on `data.num_workers` "
               "threads.")
  return "\n".join(lines)


def compile_memory_table() -> str:
  """docs/compile_memory.jsonl (`genimg bench --topology` records) as a
  table of memory per chip, by model, mesh.fsdp and model.remat."""
  with open(os.path.join(DOCS, "compile_memory.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  records.sort(key=lambda r: (r["model"], r["batch"], r["fsdp"],
                              r["remat"] != "none", r["remat"]))
  gib = lambda n: f"{n / 2**30:.2f}"
  lines = ["| model | batch | mesh.fsdp | model.remat | arguments (state + "
           "batch), GiB | temporaries, GiB | peak, GiB per chip | GFLOP per "
           "chip and step |", "|---|---|---|---|---|---|---|---|"]
  for r in records:
    lines.append(f"| {r['model']} | {r['batch']} | {r['fsdp']} | "
                 f"{r['remat']} | {gib(r['argument'])} | {gib(r['temp'])} | "
                 f"{gib(r['peak_bytes'])} | {r['flops'] / 1e9:,.0f} |")
  r = records[-1]
  lines.append("")
  lines.append(f"{r['devices']} x {r['device_kind']} (topology "
               f"{r['topology']}), model.dtype {r['dtype']}, jax "
               f"{r['jax_version']} with libtpu; XLA's compile-time memory "
               "analysis of the train step compiled for the topology on a "
               "CPU host (no TPU ran). peak = arguments + outputs - donated "
               "+ temporaries; GFLOP: the compiled per-chip program's count "
               f"(remat's recomputation included). Each compile took "
               f"{min(x['compile_s'] for x in records) / 60:.0f}-"
               f"{max(x['compile_s'] for x in records) / 60:.0f} min on the "
               "shared 2-core host.")
  return "\n".join(lines)


if __name__ == "__main__":
  if sys.argv[1:] == ["loader"]:
    replace_between(os.path.join(DOCS, "data.md"), "loader-table",
                    loader_table())
  elif sys.argv[1:] == ["compile"]:
    replace_between(os.path.join(DOCS, "training.md"), "compile-memory-table",
                    compile_memory_table())
  else:
    sys.exit(__doc__)
