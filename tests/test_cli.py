"""The `genimg` command explains itself: --version, configs, --print-config."""

import os

import pytest

from genimg_jax import cli


def test_version_names_the_package_and_jax(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["--version"])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("genimg-jax ") and "jax " in out


def test_configs_lists_every_packaged_config(capsys):
  assert cli.main(["configs"]) == 0
  out = capsys.readouterr().out
  names = [line.split()[0] for line in out.splitlines()
           if line and not line.startswith("data sets")]
  assert {"cnn", "dcgan", "ddpm", "flow", "vae_conv", "dit"} <= set(names)
  assert "common" not in names and "folder:PATH" in out


def test_print_config_shows_the_overrides_and_writes_nothing(
    capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.main(["train", "--config", "dcgan", "--print-config",
                   "--config.num_steps=7"]) == 0
  assert "num_steps: 7" in capsys.readouterr().out
  assert os.listdir(tmp_path) == []
  # A bad value is still refused, and a run needs a workdir.
  assert cli.main(["train", "--config", "dcgan", "--print-config",
                   "--config.num_steps=-1"]) == 2
  assert cli.main(["train", "--config", "dcgan"]) == 2
  assert "--workdir" in capsys.readouterr().err


# --help and the docs agree with the parser.

import glob  # pylint: disable=g-import-not-at-top,g-bad-import-order
import re  # pylint: disable=g-import-not-at-top,g-bad-import-order

from conftest import REPO  # pylint: disable=g-import-not-at-top,g-bad-import-order


def _subparsers():
  """{name: argparse parser} of every `genimg` subcommand."""
  parser = cli._parser()  # pylint: disable=protected-access
  return next(a.choices for a in parser._actions  # pylint: disable=protected-access
              if isinstance(getattr(a, "choices", None), dict))


def _flags(parser):
  return {o for a in parser._actions for o in a.option_strings  # pylint: disable=protected-access
          if o.startswith("--") and o != "--help"}


def documented_flags(texts, commands):
  """{command: {--flag: [where]}} from every `genimg COMMAND ...` in `texts`
  ({where: text}; a backslash-newline continues a command)."""
  # A command ends at a newline, a backtick, a pipe, ;, && or a # comment.
  names = "|".join(re.escape(c) for c in sorted(commands, key=len,
                                                 reverse=True))
  pattern = re.compile(
      r"genimg (%s)(?![\w-])((?:(?! \| | && | #|;)[^\n`])*)" % names)
  found = {c: {} for c in commands}
  for where, text in texts.items():
    for match in pattern.finditer(text.replace("\\\n", " ")):
      for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?![\w.-])",
                             match.group(2)):
        found[match.group(1)].setdefault(flag, []).append(where)
  return found


def _doc_texts():
  paths = [os.path.join(REPO, "README.md"),
           *glob.glob(os.path.join(REPO, "docs", "*.md")),
           *glob.glob(os.path.join(REPO, "experiments", "*.py")),
           *glob.glob(os.path.join(REPO, "experiments", "*.sh"))]
  texts = {"genimg_jax/cli.py docstring": cli.__doc__}
  for path in sorted(paths):
    with open(path, encoding="utf-8") as f:
      texts[os.path.relpath(path, REPO)] = f.read()
  return texts


def test_documented_flags_read_from_commands_and_continuations():
  found = documented_flags(
      {"a": "`genimg eval --workdir W --config.x=1` and --num\n"
            "genimg sample --num 3 \\\n    --seed 1 | genimg eval-x --y"},
      ["eval", "sample", "eval-x"])
  assert found == {"eval": {"--workdir": ["a"]},
                   "sample": {"--num": ["a"], "--seed": ["a"]},
                   "eval-x": {"--y": ["a"]}}


def test_every_documented_flag_is_the_parsers_and_every_flag_is_documented():
  """The commands in the CLI docstring (`genimg --help`), README.md,
  docs/*.md and experiments/ name only flags their subcommand has, and name
  each flag of each subcommand at least once."""
  subparsers = _subparsers()
  found = documented_flags(_doc_texts(), subparsers)
  unknown = [f"{', '.join(sorted(set(where)))}: genimg {command} {flag}"
             for command, flags in found.items()
             for flag, where in flags.items()
             if flag not in _flags(subparsers[command]) | {"--help"}]
  undocumented = [f"genimg {command} {flag}"
                  for command, parser in subparsers.items()
                  for flag in sorted(_flags(parser) - set(found[command]))]
  assert not unknown, "\n".join(unknown)
  assert not undocumented, "\n".join(undocumented)


def test_each_subcommand_with_a_config_shows_the_override_syntax():
  from genimg_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  subparsers = _subparsers()
  with_config = {name for name, parser in subparsers.items()
                 if "--config" in _flags(parser) or name in ("eval", "sample")}
  assert with_config | {"bench"} == set(cli.OVERRIDE_EXAMPLES)
  keys = set(config_lib.flat_keys(config_lib.load_config_file("dcgan")))
  for name, example in cli.OVERRIDE_EXAMPLES.items():
    text = subparsers[name].format_help()
    assert "--config.KEY=VALUE" in text and example in text, name
    for override in example.split():
      assert override.startswith("--config.")
      assert override[len("--config."):].split("=")[0] in keys, override
  for name in set(subparsers) - set(cli.OVERRIDE_EXAMPLES):
    assert "--config.KEY" not in subparsers[name].format_help(), name
  # Help texts say what the code does.
  sample_help = subparsers["sample"].format_help()
  assert "latest checkpoint" not in sample_help and "--checkpoint" in sample_help
  sweep_help = next(a.help for a in subparsers["bench"]._actions  # pylint: disable=protected-access
                    if "--sweep" in a.option_strings)
  assert "jump" in sweep_help and "bisect" in sweep_help


@pytest.mark.parametrize("argv", [
    ["prepare", "--input", "a", "--output", "b", "--config.batch_size=2"],
    ["bench", "--sweep", "--config.batch_size=2"],
])
def test_overrides_where_no_config_reads_them_are_refused(argv, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "--config.batch_size=2" in err and err.count("\n") == 1
