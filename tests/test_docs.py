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
