"""The docs' measured tables agree with the records they are rendered from."""

import importlib.util
import json
import os
import shutil

import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location(
    "render_tables", os.path.join(REPO, "docs", "render_tables.py"))
render_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_tables)


def test_the_loader_table_is_rendered_from_its_records():
  assert render_tables.current(os.path.join(REPO, "docs", "data.md"),
                               "loader-table") == render_tables.loader_table()


PEER_TABLES = [("docs/performance.md", "cpu-peers-table", "cpu_peers_table",
                ()),
               ("docs/performance.md", "cpu-ab-table", "cpu_ab_table",
                ("quiet",)),
               ("docs/performance.md", "cpu-layers-table",
                "cpu_layers_table", ()),
               ("README.md", "cpu-peers-readme", "cpu_peers_readme", ())]


@pytest.mark.parametrize("page,marker,render,args", PEER_TABLES,
                         ids=[m for _, m, _, _ in PEER_TABLES])
def test_the_cpu_speed_tables_are_rendered_from_their_records(
    page, marker, render, args):
  """`python docs/render_tables.py peers`: docs/cpu_peers.jsonl and
  docs/cpu_keras_xla.jsonl -> docs/performance.md and the README."""
  assert render_tables.current(os.path.join(REPO, page), marker) == (
      getattr(render_tables, render)(*args))


def test_the_readme_peer_ratios_are_the_medians_of_the_rounds():
  records = [json.loads(line) for line in
             open(os.path.join(REPO, "docs", "cpu_peers.jsonl"))]
  ms = lambda fw: sorted(r["step_ms_median"] / next(
      g["step_ms_median"] for g in records if g["framework"] == "genimg-jax"
      and g["model"] == "dcgan" and g["round"] == r["round"])
                         for r in records
                         if r["framework"] == fw and r["model"] == "dcgan")
  xla = ms("tf-keras-xla")
  assert len(xla) >= 3
  row = next(line for line in render_tables.cpu_peers_readme().split("\n")
             if line.startswith("| Keras + XLA |"))
  assert row.split(" | ")[2] == f"{xla[len(xla) // 2]:.2f}x"  # DCGAN.


RESULTS_TABLES = sorted(render_tables.results_tables())


@pytest.mark.parametrize("page,marker", RESULTS_TABLES,
                         ids=[m for _, m in RESULTS_TABLES])
def test_every_results_table_is_rendered_from_its_records(page, marker):
  """README.md, docs/results.md, docs/diffusion.md: `python
  docs/render_tables.py results` rewrites them from docs/results/*.jsonl."""
  assert render_tables.current(page, marker) == (
      render_tables.results_tables()[(page, marker)])


def test_the_readme_shows_the_latest_record_at_the_largest_step(
    monkeypatch, tmp_path):
  for family in render_tables.FAMILIES:
    shutil.copy(os.path.join(render_tables.RESULTS, f"{family}.jsonl"),
                tmp_path)
  monkeypatch.setattr(render_tables, "RESULTS", str(tmp_path))
  rows = lambda: [line for line in
                  render_tables.readme_results_table().split("\n")
                  if "| `dcgan` |" in line]
  assert rows() == ["| DCGAN | `dcgan` | FID 5.31, score 3.24 | 3,000 x 64 |"]
  dcgan = [json.loads(line) for line in open(tmp_path / "gan.jsonl")][2]
  with open(tmp_path / "gan.jsonl", "a") as f:
    for step, fid in ((3000, 5.01), (2000, 4.0)):  # A rerun, then an early one.
      f.write(json.dumps(dict(dcgan, eval={"step": step, "fid": fid,
                                           "score": 3.5})) + "\n")
  assert rows() == ["| DCGAN | `dcgan` | FID 5.01, score 3.50 | 3,000 x 64 |"]


def test_a_rerun_of_the_same_command_is_its_own_run():
  """Records with a run_id group apart from earlier runs of the command:
  a rerun's wall time and evaluations are not merged into the old row."""
  old = {"command": "genimg train --config experiments/dcgan.py --workdir W",
         "eval": {"step": 3000, "fid": 5.4}, "wall_s": 1057}
  new = dict(old, eval={"step": 3000, "fid": 5.3}, wall_s=432,
             run_id="abc@1")
  groups = render_tables.runs([old, dict(old, eval={"step": 1000}), new])
  assert [len(g) for g in groups.values()] == [2, 1]
  assert render_tables.wall_text(list(groups.values())[0]).startswith(
      "17 min")


def test_a_record_is_made_from_a_workdir_and_its_timed_log():
  eval_json = {"step": 2000, "fid": 2.5, "score": 4.5}
  config_json = {"batch_size": 64, "eval_samples": 10000,
                 "diffusion": {"sampler": "ddim", "sample_steps": 20,
                               "eta": 0.0}}
  log = "step 2000\nwall_s=61.52 user_s=100.10 system_s=9.60\n"
  env = {"hardware": "2-core CPU", "device_kind": "cpu",
         "jax_version": "0.0", "commit": None, "load": "idle"}
  record = render_tables.make_record(
      eval_json, config_json,
      "genimg train --config experiments/ddpm.py:cifar10,full --workdir W",
      "diffusion", "DDPM", log, env)
  assert record == {
      "model": "DDPM", "config": "ddpm", "dataset": "cifar10",
      "variant": "full", "command": "genimg train --config "
      "experiments/ddpm.py:cifar10,full --workdir W", "eval": eval_json,
      "eval_samples": 10000,
      "sampler": {"name": "ddim", "steps": 20, "eta": 0.0},
      "batch_size": 64, "hardware": "2-core CPU", "device_kind": "cpu",
      "jax_version": "0.0", "load": "idle", "wall_s": 62,
      "cpu_s": {"user": 100, "system": 10}}
  record = dict(record, family="diffusion")
  assert render_tables.metric_text(record, bold=False, short=True) == (
      "FID 2.50 (DDIM, 20 steps)")
  assert render_tables.config_arg(record) == "ddpm:cifar10,full"


def test_durations_read_as_in_the_tables():
  assert render_tables.duration(552) == "9 min 12 s"
  assert render_tables.duration(6300) == "1 h 45 min"
  assert render_tables.duration(6922) == "1 h 55 min 22 s"
  assert render_tables.duration(45) == "45 s"
  assert render_tables.duration(3604) == "1 h 4 s"


# README.md and the docs pages: their size, their wording and their links.

import glob
import re

README = os.path.join(REPO, "README.md")
PAGES = [README, *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]

# Docs describe the software as it is; the history of the work is in git and
# CHANGELOG.md.
WORK_NARRATIVE = re.compile(
    r"session [0-9]|issue [0-9]|issues? #?[0-9]|the brief|this session",
    re.IGNORECASE)


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _without_code_blocks(text):
  """The text with fenced code blocks blanked (their lines kept)."""
  out, fenced = [], False
  for line in text.split("\n"):
    if line.lstrip().startswith("```"):
      fenced = not fenced
      out.append("")
    else:
      out.append("" if fenced else line)
  return "\n".join(out)


def github_slug(heading):
  """GitHub's anchor of a heading: lowercase, punctuation other than '-' and
  '_' dropped, spaces to '-'."""
  text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
  text = text.lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(path):
  """The anchors of a page's headings (GitHub numbers repeated ones -1, -2)."""
  seen, result = {}, set()
  for line in _without_code_blocks(_read(path)).split("\n"):
    match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not match:
      continue
    slug = github_slug(match.group(1))
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    result.add(slug if count == 0 else f"{slug}-{count}")
  return result


def test_the_readme_is_at_most_10500_bytes():
  assert os.path.getsize(README) <= 10_500


def test_the_docs_carry_no_work_narrative():
  found = []
  for path in PAGES:
    for number, line in enumerate(_read(path).split("\n"), 1):
      for match in WORK_NARRATIVE.finditer(line):
        found.append(f"{os.path.relpath(path, REPO)}:{number}: {match.group(0)!r}")
  assert not found, "\n".join(found)


def test_github_slug_follows_githubs_rules():
  assert github_slug("Train step on one NVIDIA H200") == (
      "train-step-on-one-nvidia-h200")
  assert github_slug("Config values, exit codes and signals") == (
      "config-values-exit-codes-and-signals")
  assert github_slug("Train-step throughput (`genimg bench`)") == (
      "train-step-throughput-genimg-bench")
  assert github_slug("x_0 and eps: the targets") == "x_0-and-eps-the-targets"


def test_every_relative_link_points_to_a_file_and_heading_that_exist():
  broken = []
  for path in PAGES:
    text = _without_code_blocks(_read(path))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
        continue  # https:, mailto: and other absolute URLs.
      file_part, _, anchor = target.partition("#")
      linked = (os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                if file_part else path)
      where = f"{os.path.relpath(path, REPO)}: ({target})"
      if not os.path.exists(linked):
        broken.append(f"{where}: no such file")
      elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
        broken.append(f"{where}: no such heading")
  assert not broken, "\n".join(broken)


def test_the_readme_train_loop_runs_as_written(monkeypatch, tmp_path):
  """The README's python block, executed (3 DCGAN steps on the offline
  Fashion-MNIST; skipped without it)."""
  import re  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from genimg_jax import data  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(data.DEBIAN_FASHION_MNIST):
    pytest.skip("needs Debian's dataset-fashion-mnist")
  with open(os.path.join(REPO, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert len(blocks) == 1
  from genimg_jax import distributed  # pylint: disable=g-import-not-at-top
  # The suite's 8 emulated devices stay: one device per core would change
  # the process's backend.
  monkeypatch.setattr(distributed, "use_cpu_cores", lambda: None)
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert set(namespace["metrics"]) >= {"d_loss", "g_loss"}
