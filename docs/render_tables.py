"""Renders the docs' measured tables from the JSON lines they come from.

  python docs/render_tables.py loader   # docs/loader_bench.jsonl -> docs/data.md
  python docs/render_tables.py results  # docs/results/*.jsonl -> README.md,
                                        # docs/results.md, docs/diffusion.md
  python docs/render_tables.py record --workdir W --family F --model M \
      --command "genimg train ..." [--log LOG]  # appends W's record
  python docs/render_tables.py compile  # docs/compile_memory.jsonl -> docs/training.md
  python docs/render_tables.py peers    # docs/cpu_peers.jsonl, cpu_keras_xla.jsonl -> docs/performance.md, README.md
"""

import json
import os
import re
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


# Results: docs/results/*.jsonl, one record per evaluation (see docs/results.md).

RESULTS = os.path.join(DOCS, "results")
FAMILIES = ("classifier", "gan", "vae", "diffusion")
# (config, dataset, variant) shown in the README's results table.
README_RUNS = (("cnn", "fashion_mnist", "local"),
               ("resnet", "fashion_mnist", "full"),
               ("dcgan", "fashion_mnist", "local"),
               ("cgan", "fashion_mnist", "local"),
               ("vae_conv", "fashion_mnist", "local"),
               ("ddpm", "fashion_mnist", "local"),
               ("flow", "fashion_mnist", "local"),
               ("latent_dit", "fashion_mnist", "local"))
SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler",
                 "heun": "Heun"}


def load_results(family: str) -> list[dict]:
  """The records of docs/results/FAMILY.jsonl, in file order."""
  with open(os.path.join(RESULTS, f"{family}.jsonl")) as f:
    return [dict(json.loads(line), family=family) for line in f if line.strip()]


def all_results() -> list[dict]:
  return [r for family in FAMILIES for r in load_results(family)]


def run_command(r: dict) -> str:
  """The train command of the run a record evaluates."""
  return r.get("train_command", r["command"])


def run_key(r: dict) -> str:
  """The training run a record evaluates: its train command, and its
  run_id where the same command ran again."""
  key = run_command(r)
  return f"{key} #{r['run_id']}" if r.get("run_id") else key


def runs(records: list[dict]) -> dict[str, list[dict]]:
  """Records grouped by run, runs in order of first appearance."""
  groups = {}
  for r in records:
    groups.setdefault(run_key(r), []).append(r)
  return groups


def headline(records: list[dict]) -> dict:
  """The latest record at the largest step with the most samples."""
  top = max((r["eval"]["step"], r.get("eval_samples", 0)) for r in records)
  return [r for r in records
          if (r["eval"]["step"], r.get("eval_samples", 0)) == top][-1]


def run_field(records: list[dict], key: str):
  """The last value of `key` among a run's records (None if none has it)."""
  values = [r[key] for r in records if r.get(key) is not None]
  return values[-1] if values else None


def duration(seconds: float) -> str:
  """1 h 55 min 22 s, 9 min 12 s, 45 s (zero parts after the first left out)."""
  s = int(round(seconds))
  parts = [(s // 3600, "h"), (s % 3600 // 60, "min"), (s % 60, "s")]
  while parts[0][0] == 0 and len(parts) > 1:
    parts.pop(0)
  return " ".join(f"{n} {unit}" for n, unit in parts if n or unit == parts[0][1])


def override(r: dict, key: str):
  """The value of --config.KEY=V in the record's command, or None."""
  for arg in r["command"].split():
    if arg.startswith(f"--config.{key}="):
      return arg.split("=", 1)[1]
  return None


def config_arg(r: dict) -> str:
  """`cnn`, `resnet:fashion_mnist,full`: --config as `genimg` takes it."""
  if (r["dataset"], r["variant"]) == ("fashion_mnist", "local"):
    return r["config"]
  if r["variant"] == "local":
    return f"{r['config']}:{r['dataset']}"
  return f"{r['config']}:{r['dataset']},{r['variant']}"


def steps_x_batch(r: dict, epochs: bool = True) -> str:
  batch = r["batch_size"]
  if r.get("batches_per_step"):
    batch = f"({r['batches_per_step']} x {batch})"
  text = f"{r['eval']['step']:,} x {batch}"
  if epochs and r.get("epochs"):
    text += f" ({r['epochs']} epochs)"
  return text


def sampler_text(r: dict, eta: bool = True) -> str:
  """DDIM, 20 steps, eta 0."""
  s = r["sampler"]
  text = f"{SAMPLER_NAMES.get(s['name'], s['name'])}, {s['steps']} steps"
  return text + (f", eta {s['eta']}" if eta and "eta" in s else "")


def fid_score(r: dict, bold: bool = False) -> str:
  """5.38 / 3.18 (the FID bold if asked)."""
  e = r["eval"]
  fid = f"**{e['fid']:.2f}**" if bold else f"{e['fid']:.2f}"
  return fid + (f" / {e['score']:.2f}" if "score" in e else "")


def metric_text(r: dict, bold: bool = True, short: bool = False) -> str:
  """A run's headline metrics; `short`: the README's (one per metric)."""
  e, b = r["eval"], (lambda x: f"**{x}**" if bold else x)
  if r["family"] == "classifier":
    return "test accuracy " + b(f"{100 * e['accuracy']:.2f}%")
  if r["family"] == "vae":
    k = int(override(r, "vae.iw_samples") or 1000)
    text = (f"IWAE({k:,}) " + b(f"{e['iw_nll']:.2f}") +
            f" nats, FID {e['fid']:.2f}")
    return text if short else (f"-ELBO {e['nelbo']:.2f}, {text}, "
                               f"score {e['score']:.2f}")
  text = "FID " + b(f"{e['fid']:.2f}")
  if not short or r["family"] != "diffusion":
    text += f", score {e['score']:.2f}" if "score" in e else ""
  if r["family"] == "diffusion":
    text += f" ({sampler_text(r, eta=not short)})"
  return text


def wall_text(records: list[dict]) -> str:
  """A run's wall time, what it includes and the machine's load."""
  wall = run_field(records, "wall_s")
  if wall is None:
    return "-"
  text = duration(wall)
  if run_field(records, "wall_note"):
    text += f" {run_field(records, 'wall_note')}"
  load = run_field(records, "load")
  return text + (f" ({load})" if load else "")


def readme_results_table() -> str:
  records = all_results()
  lines = ["| model | config | metric | steps x batch |",
           "| --- | --- | --- | --- |"]
  for key in README_RUNS:
    matching = [r for r in records
                if (r["config"], r["dataset"], r["variant"]) == key]
    if not matching:
      raise ValueError(f"README_RUNS {key}: no record in docs/results/")
    r = headline(matching)
    lines.append(f"| {r['model']} | `{config_arg(r)}` | "
                 f"{metric_text(r, bold=False, short=True)} | "
                 f"{steps_x_batch(r, epochs=False)} |")
  return "\n".join(lines)


def every_run_table() -> str:
  lines = ["| experiment | data, variant | metric | hardware | steps x batch "
           "| wall time | commit | command |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for rs in runs(all_results()).values():
    r = headline(rs)
    variant = r["variant"] + (" (shortened)" if override(r, "num_steps")
                              else "")
    hardware = run_field(rs, "hardware") or "-"
    if run_field(rs, "devices"):
      hardware += f", {run_field(rs, 'devices')} devices"
    hardware += f", jax {r['jax_version']}" if r.get("jax_version") else ""
    lines.append(
        f"| {r['model']} | {r['dataset']}, {variant} | {metric_text(r)} | "
        f"{hardware} | {steps_x_batch(r)} | {wall_text(rs)} | "
        f"{run_field(rs, 'commit') or '-'} | `{run_command(r)}` |")
  return "\n".join(lines)


def classifier_table() -> str:
  lines = ["| model | variant | test accuracy | epochs | steps x batch | "
           "wall time | command |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for rs in runs(load_results("classifier")).values():
    r = headline(rs)
    lines.append(
        f"| {r.get('description', r['model'])} | {r['variant']} | "
        f"**{100 * r['eval']['accuracy']:.2f}%** | {r.get('epochs', '-')} | "
        f"{steps_x_batch(r, epochs=False)} | {wall_text(rs)} | "
        f"`{run_command(r)}` |")
  return "\n".join(lines)


def gan_table() -> str:
  lines = ["| config | FID / score (at steps) | steps x batch | wall time | "
           "command |", "| --- | --- | --- | --- | --- |"]
  for rs in runs(load_results("gan")).values():
    r = headline(rs)
    evals = sorted((x for x in rs if x.get("eval_samples") ==
                    r.get("eval_samples")), key=lambda x: x["eval"]["step"])
    curve = ", ".join(f"{fid_score(x, bold=x is r)} ({x['eval']['step']:,})"
                      for x in evals)
    lines.append(f"| {r.get('description', r['model'])} | {curve} | "
                 f"{steps_x_batch(r)} | {wall_text(rs)} | `{run_command(r)}` |")
  return "\n".join(lines)


def vae_table() -> str:
  lines = ["| model | -ELBO | KL | recon | IWAE NLL (K) | prior-sample FID / "
           "score | epochs | wall time | command |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for rs in runs(load_results("vae")).values():
    r = headline(rs)
    e, k = r["eval"], int(override(r, "vae.iw_samples") or 1000)
    lines.append(
        f"| {r.get('description', r['model'])} | {e['nelbo']:.2f} "
        f"({e['bits_per_dim']:.3f}) | {e['kl']:.2f} | {e['recon']:.2f} | "
        f"**{e['iw_nll']:.2f}** ({k:,}) | {fid_score(r)} | "
        f"{r.get('epochs', '-')} | {wall_text(rs)} | `{run_command(r)}` |")
  return "\n".join(lines)


def _unet_diffusion(samples: int) -> list[dict]:
  """The pixel UNet configs' records on Fashion-MNIST with `samples`."""
  return [r for r in load_results("diffusion")
          if r["config"] in ("ddpm", "flow") and r.get("eval_samples") ==
          samples and r["dataset"] == "fashion_mnist"]


def diffusion_table() -> str:
  lines = ["| run | steps x batch | FID / score | sampler | evaluated | "
           "wall time of the run | CPU time of the run |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in _unet_diffusion(10000):
    if "eval_wall_s" in r:
      evaluated = f"afterwards: {r['eval_wall_s']:,} s ({r['eval_load']})"
    else:
      evaluated = "in training"
    cpu = r.get("cpu_s")
    cpu = (f"{cpu['user']:,} s user + {cpu['system']:,} s system"
           if cpu else "")
    wall = wall_text([r]) if "wall_s" in r else ""
    lines.append(f"| {r.get('description', r['model'])} | {steps_x_batch(r)} "
                 f"| {fid_score(r)} | {sampler_text(r)} | {evaluated} | "
                 f"{wall} | {cpu} |")
  return "\n".join(lines)


def sampler_table() -> str:
  records = _unet_diffusion(2000)
  best = {}
  for r in records:
    if r["eval"]["fid"] < best.get(r["config"], {"eval": {"fid": 1e9}})[
        "eval"]["fid"]:
      best[r["config"]] = r
  lines = ["| model | sampler | steps (network evaluations) | FID / score "
           "(2,000 samples) | wall time of the command |",
           "| --- | --- | --- | --- | --- |"]
  for r in records:
    s = r["sampler"]
    calls = 2 * s["steps"] - 1 if s["name"] == "heun" else s["steps"]
    name = SAMPLER_NAMES.get(s["name"], s["name"])
    name += f", eta {s['eta']}" if "eta" in s else ""
    lines.append(f"| {r['config'].upper() if r['config'] == 'ddpm' else r['config']} "
                 f"| {name} | {s['steps']} ({calls}) | "
                 f"{fid_score(r, bold=r is best[r['config']])} | "
                 f"{r['eval_wall_s']:,} s ({r['eval_load']}) |")
  return "\n".join(lines)


def latent_dit_table() -> str:
  """Pixel UNet, pixel DiT and latent DiT on Fashion-MNIST at 10,000
  samples, with the training runs' CPU time."""
  records = [r for r in load_results("diffusion")
             if r["config"] in ("ddpm", "dit", "latent_dit") and
             r.get("eval_samples") == 10000 and r["eval"]["step"] == 2000]
  lines = ["| run | steps x batch | FID / score | sampler | wall time of the "
           "run | CPU time of the run |", "| --- | --- | --- | --- | --- | --- |"]
  for r in records:
    rs = runs(load_results("diffusion"))[run_key(r)]
    cpu = run_field(rs, "cpu_s")
    cpu = (f"{cpu['user'] + cpu['system']:,} s ({cpu['user']:,} user + "
           f"{cpu['system']:,} system)" if cpu else "-")
    if run_field(rs, "cpu_note"):
      cpu += f"; {run_field(rs, 'cpu_note')}"
    lines.append(f"| {r.get('description', r['model'])} | {steps_x_batch(r)} "
                 f"| {fid_score(r)} | {sampler_text(r)} | {wall_text(rs)} | "
                 f"{cpu} |")
  return "\n".join(lines)


def results_tables() -> dict[tuple[str, str], str]:
  """{(page, marker): table} of every table rendered from docs/results/."""
  readme = os.path.join(os.path.dirname(DOCS), "README.md")
  results = os.path.join(DOCS, "results.md")
  diffusion = os.path.join(DOCS, "diffusion.md")
  return {(readme, "results-table"): readme_results_table(),
          (results, "every-run-table"): every_run_table(),
          (results, "classifier-table"): classifier_table(),
          (results, "gan-table"): gan_table(),
          (results, "vae-table"): vae_table(),
          (diffusion, "diffusion-table"): diffusion_table(),
          (diffusion, "sampler-table"): sampler_table(),
          (os.path.join(DOCS, "latent.md"), "latent-dit-table"):
              latent_dit_table()}


# A record from a finished run: python docs/render_tables.py record ...

TIMING = re.compile(r"wall_s=([0-9.]+) user_s=([0-9.]+) system_s=([0-9.]+)")


def parse_config_arg(command: str) -> tuple[str, str, str]:
  """(config, dataset, variant) of a command's --config
  (experiments/resnet.py:fashion_mnist,full -> resnet, fashion_mnist, full)."""
  args = command.split()
  value = args[args.index("--config") + 1]
  path, _, arg = value.partition(":")
  dataset, _, variant = arg.partition(",")
  name = os.path.basename(path)
  return (name[:-3] if name.endswith(".py") else name,
          dataset or "fashion_mnist", variant or "local")


def parse_timing(log_text: str) -> dict:
  """wall_s and cpu_s from the last `wall_s=R user_s=U system_s=S` line
  (bash's `time` with TIMEFORMAT='wall_s=%R user_s=%U system_s=%S')."""
  found = TIMING.findall(log_text)
  if not found:
    return {}
  wall, user, system = (float(x) for x in found[-1])
  return {"wall_s": round(wall), "cpu_s": {"user": round(user),
                                          "system": round(system)}}


def make_record(eval_json: dict, config_json: dict, command: str,
                family: str, model: str, log_text: str = "",
                environment: dict | None = None) -> dict:
  """A results record: the run's eval.json under "eval", what ran and where.

  eval_json: WORKDIR/eval.json; config_json: WORKDIR/config.json;
  environment: hardware, device_kind, jax_version, commit, load (measured by
  `environment()` when None)."""
  config, dataset, variant = parse_config_arg(command)
  r = {"model": model, "config": config, "dataset": dataset,
       "variant": variant, "command": command, "eval": eval_json}
  if family != "classifier" and config_json.get("eval_samples"):
    r["eval_samples"] = config_json["eval_samples"]
  if family == "diffusion":
    d = config_json.get("diffusion", {})
    r["sampler"] = {"name": d.get("sampler"), "steps": d.get("sample_steps")}
    if d.get("sampler") == "ddim":
      r["sampler"]["eta"] = d.get("eta")
  r["batch_size"] = config_json["batch_size"]
  if config_json.get("gan", {}).get("n_critic", 1) > 1:
    r["batches_per_step"] = config_json["gan"]["n_critic"]
  r.update(environment if environment is not None else _environment())
  r.update(parse_timing(log_text))
  return {k: v for k, v in r.items() if v is not None}


def _environment() -> dict:
  """This machine: CPU model and cores, device kind, jax, git commit, load."""
  import platform  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = re.findall(r"model name\s*:\s*(.*)", f.read())
    cpu = names[0] if names else cpu
  device = jax.devices()[0]
  hardware = f"{os.cpu_count()}-core {cpu}"
  if device.platform != "cpu":
    hardware += f", {jax.device_count()} x {device.device_kind}"
  try:
    commit = subprocess.run(
        ["git", "-C", DOCS, "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=True).stdout.strip() or None
  except (OSError, subprocess.CalledProcessError):
    commit = None
  return {"hardware": hardware, "device_kind": device.device_kind.lower(),
          "jax_version": jax.__version__, "commit": commit,
          "load": f"1-minute load average {os.getloadavg()[0]:.1f} at the end"}


def _record_main(argv: list[str]) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="render_tables.py record",
      description="Appends a finished run's record to docs/results/FAMILY"
                  ".jsonl (then run `render_tables.py results`).")
  parser.add_argument("--workdir", required=True,
                      help="the run's workdir (eval.json, config.json)")
  parser.add_argument("--family", required=True, choices=FAMILIES)
  parser.add_argument("--model", required=True, help='e.g. "DCGAN"')
  parser.add_argument("--command", required=True,
                      help="the genimg command that made the workdir")
  parser.add_argument("--log", default="",
                      help="the command's log, ending with a line "
                           "wall_s=R user_s=U system_s=S")
  parser.add_argument("--output", default="",
                      help="default docs/results/FAMILY.jsonl")
  parser.add_argument("--description", default="",
                      help="the run's row label in the family table")
  parser.add_argument("--wall-note", default="",
                      help='what the wall time includes, e.g. "training only"')
  args = parser.parse_args(argv)
  read = lambda name: json.load(open(os.path.join(args.workdir, name)))
  log_text = open(args.log).read() if args.log else ""
  record = make_record(read("eval.json"), read("config.json"), args.command,
                       args.family, args.model, log_text)
  # Separates a rerun of the same command from earlier runs' records.
  record["run_id"] = (f"{record.get('commit')}@"
                      f"{int(os.path.getmtime(os.path.join(args.workdir, 'eval.json')))}")
  if args.description:
    record["description"] = args.description
  if args.wall_note:
    record["wall_note"] = args.wall_note
  output = args.output or os.path.join(RESULTS, f"{args.family}.jsonl")
  with open(output, "a") as f:
    f.write(json.dumps(record) + "\n")
  print(json.dumps(record))


def render_results() -> None:
  for (page, marker), table in results_tables().items():
    replace_between(page, marker, table)


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
    if "does_not_fit" in r:
      lines.append(f"| {r['model']} | {r['batch']} | {r['fsdp']} | "
                   f"{r['remat']} | does not fit: {r['does_not_fit']} | | | |")
      continue
    lines.append(f"| {r['model']} | {r['batch']} | {r['fsdp']} | "
                 f"{r['remat']} | {gib(r['argument'])} | {gib(r['temp'])} | "
                 f"{gib(r['peak_bytes'])} | {r['flops'] / 1e9:,.0f} |")
  records = [x for x in records if "does_not_fit" not in x]
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


def cpu_ab_table(which: str) -> str:
  """The in-process A/B records of docs/cpu_keras_xla.jsonl whose "set" is
  `which` (`python benchmarks/ab_steps.py` output plus where it ran): one
  row per variant, per model the ratio first variant ms / this variant ms
  (median over steps; above 1: the variant is faster) with both medians."""
  with open(os.path.join(DOCS, "cpu_keras_xla.jsonl")) as f:
    records = [r for r in map(json.loads, filter(str.strip, f))
               if r.get("set") == which]
  models = sorted({r["model"] for r in records})
  rows: dict[str, dict[str, list[str]]] = {}
  for r in records:
    names = list(r["variants"])
    first = r["variants"][names[0]]
    for name in names[1:]:
      v = r["variants"][name]
      rows.setdefault(r["labels"][name], {}).setdefault(r["model"], []).append(
          f"{v['first_over_this']:.3f} ({first['median_ms']:.1f} / "
          f"{v['median_ms']:.1f} ms)")
  lines = ["| variant | " + " | ".join(models) + " |",
           "|" + " --- |" * (1 + len(models))]
  for label, cells in rows.items():
    lines.append(f"| {label} | " + " | ".join(
        "; ".join(cells.get(m, [])) for m in models) + " |")
  loads = [r["load_avg_1m"] for r in records]
  r = records[0]
  lines += ["", f"{r['hardware']}, jax {r['jax_version']}, genimg-jax at "
            f"commit {r['commit']}; 1-minute load average {min(loads):.1f}-"
            f"{max(loads):.1f} (the benchmark's own process included). "
            "Commands: " + "; ".join(sorted({f"`{x['command']}`"
                                            for x in records})) + "."]
  return "\n".join(lines)


def cpu_layers_table() -> str:
  """docs/cpu_keras_xla.jsonl's "per_layer_fwd_bwd" records: per DCGAN
  convolution the ms of one forward + backward pass by framework (median
  and range over rounds)."""
  with open(os.path.join(DOCS, "cpu_keras_xla.jsonl")) as f:
    records = [r for r in map(json.loads, filter(str.strip, f))
               if r.get("kind") == "per_layer_fwd_bwd"]
  def side(r):
    if r["framework"] == "tf-keras-graph":
      return ("Keras graph, oneDNN" if r["onednn"] != "0" else
              "Keras graph, no oneDNN (`TF_ENABLE_ONEDNN_OPTS=0`)")
    return {"tf-keras-xla": "Keras + XLA"}.get(r["framework"], r["framework"])
  sides = list(dict.fromkeys(side(r) for r in records))
  layers = list(records[0]["ms"])
  cell = lambda xs: (f"{statistics.median(xs):.1f}" if len(xs) == 1 else
                     f"{statistics.median(xs):.1f} ({min(xs):.1f}-"
                     f"{max(xs):.1f})")
  lines = ["| layer | " + " | ".join(sides) + " |",
           "|" + " --- |" * (1 + len(sides))]
  for layer in layers + ["sum"]:
    cells = []
    for s in sides:
      rs = [r for r in records if side(r) == s]
      cells.append(cell([sum(r["ms"].values()) if layer == "sum" else
                         r["ms"][layer] for r in rs]))
    lines.append(f"| {layer} | " + " | ".join(cells) + " |")
  r = records[0]
  lines += ["", f"{r['hardware']}; ms per forward + backward pass at batch "
            f"128, median over {len({x['round'] for x in records})} "
            f"alternated rounds; jax {next(x['jax'] for x in records if 'jax' in x)}, "
            f"{r['tensorflow']}; commands: " + "; ".join(
                sorted({f"`{x['command']}`" for x in records})) + "."]
  return "\n".join(lines)


def cpu_peers_readme() -> str:
  """The README's short form of cpu_peers_table: per model each peer's ms /
  genimg-jax ms, the median over rounds."""
  sys.path.insert(0, os.path.join(os.path.dirname(DOCS), "benchmarks"))
  import harness  # pylint: disable=import-outside-toplevel
  with open(os.path.join(DOCS, "cpu_peers.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  summary = harness.summarize(records)
  names = {"torch-eager": "PyTorch eager", "tf-keras-graph": "Keras (oneDNN)",
           "tf-keras-xla": "Keras + XLA"}
  peers = [p for p in names if any(f == p for _, f in summary)]
  models = {"cnn": "seed CNN", "dcgan": "DCGAN", "vae": "conv VAE"}
  lines = ["| vs | " + " | ".join(models[m] for m in sorted(
      {m for m, _ in summary})) + " |", "|" + " --- |" * (1 + len(
          {m for m, _ in summary}))]
  for p in peers:
    cells = [summary[(m, p)]["ratio"] for m in sorted({m for m, _ in summary})]
    lines.append(f"| {names[p]} | " + " | ".join(
        f"{c['median']:.2f}x" for c in cells)
                 + " |")
  return "\n".join(lines)


def cpu_peers_table() -> str:
  """docs/cpu_peers.jsonl (`python benchmarks/run.py` records) as the
  benchmark's own table, then where and with what it ran."""
  sys.path.insert(0, os.path.join(os.path.dirname(DOCS), "benchmarks"))
  import harness  # pylint: disable=import-outside-toplevel
  with open(os.path.join(DOCS, "cpu_peers.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  ours = [r for r in records if r["framework"] == harness.GENIMG]
  devices = ", ".join(f"{m} {d}" for m, d in sorted(
      {(r["model"], r["devices"]) for r in ours}))
  versions = sorted({f"{r['framework']}: {r['version']}" for r in records
                     if "version" in r})
  fws = sorted({r["framework"] for r in records})
  rounds = len({r["round"] for r in records})
  return "\n".join([
      harness.markdown_table(harness.summarize(records)), "",
      f"{records[0]['host_cpu']}; {rounds} rounds of `python "
      f"benchmarks/run.py --rounds {rounds} --frameworks {','.join(fws)}` "
      f"at batch 128 (genimg-jax at commit "
      f"{', '.join(sorted({r['genimg_commit'] for r in records}))}, "
      f"jax {ours[0]['jax_version']}, CPU devices per model: {devices}; "
      f"{'; '.join(versions)}). Records: "
      "[cpu_peers.jsonl](cpu_peers.jsonl)."])


if __name__ == "__main__":
  if sys.argv[1:] == ["loader"]:
    replace_between(os.path.join(DOCS, "data.md"), "loader-table",
                    loader_table())
  elif sys.argv[1:] == ["results"]:
    render_results()
  elif sys.argv[1:2] == ["record"]:
    _record_main(sys.argv[2:])
  elif sys.argv[1:] == ["peers"]:
    replace_between(os.path.join(DOCS, "performance.md"), "cpu-peers-table",
                    cpu_peers_table())
    replace_between(os.path.join(os.path.dirname(DOCS), "README.md"),
                    "cpu-peers-readme", cpu_peers_readme())
    replace_between(os.path.join(DOCS, "performance.md"), "cpu-ab-table",
                    cpu_ab_table("quiet"))
    replace_between(os.path.join(DOCS, "performance.md"), "cpu-layers-table",
                    cpu_layers_table())
  elif sys.argv[1:] == ["compile"]:
    replace_between(os.path.join(DOCS, "training.md"), "compile-memory-table",
                    compile_memory_table())
  else:
    sys.exit(__doc__)
