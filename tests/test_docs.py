"""The docs' measured tables agree with the records they are rendered from."""

import importlib.util
import os

from conftest import REPO

_spec = importlib.util.spec_from_file_location(
    "render_tables", os.path.join(REPO, "docs", "render_tables.py"))
render_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_tables)


def test_the_loader_table_is_rendered_from_its_records():
  assert render_tables.current(os.path.join(REPO, "docs", "data.md"),
                               "loader-table") == render_tables.loader_table()


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
