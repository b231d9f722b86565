"""The documentation site builds without a warning and covers the public API."""

import os
import re
import subprocess
import sys

import pytest

import jaxdeq
import jaxdeq.nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_PAGES = os.path.join(REPO, "docs", "api")


def test_site_builds_with_warnings_as_errors(tmp_path):
  pytest.importorskip("mkdocstrings", reason="pip install -e '.[docs]'")
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
       str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, NO_MKDOCS_2_WARNING="1"), timeout=300)
  assert result.returncode == 0, result.stderr
  page = (tmp_path / "site" / "api" / "fixed_point" / "index.html").read_text()
  assert "jaxdeq.fixed_point" in page and "max_steps" in page


def test_every_public_name_has_a_reference_entry():
  documented = set()
  for name in os.listdir(API_PAGES):
    with open(os.path.join(API_PAGES, name)) as handle:
      documented |= set(re.findall(r"^::: (\S+)$", handle.read(), re.M))
  public = {f"jaxdeq.{n}" for n in jaxdeq.__all__} | {
      f"jaxdeq.nnx.{n}" for n in jaxdeq.nnx.__all__}
  # Solver states are documented with their solver.
  states = {n for n in public if n.endswith("State")}
  assert not public - states - documented, sorted(public - states - documented)
  assert not documented - public, sorted(documented - public)


def test_readme_and_ci_run_the_same_test_command():
  with open(os.path.join(REPO, "README.md")) as handle:
    readme = handle.read()
  with open(os.path.join(REPO, ".ci", "run")) as handle:
    ci = handle.read()
  command = re.search(r"^python -m pytest .*$", ci, re.M).group(0)
  assert command in readme
