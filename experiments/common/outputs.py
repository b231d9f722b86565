"""What a run prints and writes: the log, progress bars, the epoch table,
metrics as JSON lines, and the up-front check of every output location."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import jax

from experiments.common.config import Config

METRIC_KEYS = ("epoch", "train_error", "train_loss", "test_error", "test_loss",
               "forward_steps", "backward_steps", "skipped_steps",
               "train_seconds", "test_seconds", "examples_per_second",
               "jacobian_penalty", "spectral_radius", "spectral_radius_max")


def log(*args) -> None:
  """print, from the first process only."""
  if jax.process_index() == 0:
    print(*args, flush=True)


def progress(total: int, enabled: bool, desc: str):
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, leave=False,
              disable=not (enabled and sys.stderr.isatty()),
              dynamic_ncols=True, file=sys.stderr)


_COLUMNS = (("epoch", "{:>5d}"), ("train_error", "{:>11.4f}"),
            ("train_loss", "{:>10.4f}"), ("test_error", "{:>10.4f}"),
            ("test_loss", "{:>9.4f}"), ("forward_steps", "{:>13.2f}"),
            ("test_forward_steps", "{:>18.2f}"),
            ("backward_steps", "{:>14.2f}"), ("skipped_steps", "{:>13d}"),
            ("spectral_radius", "{:>15.3f}"),
            ("train_seconds", "{:>13.2f}"), ("test_seconds", "{:>12.2f}"))


def header() -> str:
  return " ".join(f"{name:>{len(fmt.format(0))}}" if "d" in fmt else
                  f"{name:>{len(fmt.format(0.0))}}" for name, fmt in _COLUMNS)


def format_row(row: dict) -> str:
  # Rows from runs saved before a column existed print NaN there.
  return " ".join(fmt.format(row.get(name, float("nan")) if "d" not in fmt
                             else row.get(name, 0)) for name, fmt in _COLUMNS)



def check_paths(config: Config) -> None:
  """One-line errors, before any data is loaded, for outputs that cannot be
  written: each output directory is created and a file written in it, and
  whatever this check created is removed again."""
  for flag, value in (("--workdir", config.workdir),
                      ("--plots", config.plots)):
    if value:
      path = Path(value)
      if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {value} is a file; it must be a directory")
      _check_directory(path, flag, value)
  if config.metrics_out:
    path = Path(config.metrics_out)
    target = Path(os.path.realpath(path))  # a link is written through
    if target.is_dir():
      raise ValueError(f"--metrics-out {path} is a directory; it must be a"
                       " file path (one JSON line per epoch)")
    if target.exists() and not target.is_file():
      raise ValueError(f"--metrics-out {path}: {target} is not a regular"
                       " file")
    _check_directory(target.parent, "--metrics-out", path)


def _check_directory(path: Path, flag: str, given) -> None:
  """Raises ValueError unless a file can be written in directory `path`."""
  missing = []
  ancestor = path.absolute()
  while not ancestor.exists():
    missing.append(ancestor)
    ancestor = ancestor.parent
  if not ancestor.is_dir():
    raise ValueError(f"{flag} {given}: {ancestor} is a file, not a"
                     " directory")
  created = []
  try:
    for directory in reversed(missing):
      directory.mkdir()
      created.append(directory)
    with tempfile.TemporaryFile(dir=path.absolute()):
      pass
  except OSError as error:
    raise ValueError(f"{flag} {given}: cannot write there"
                     f" ({error.strerror or error})") from None
  finally:
    for directory in reversed(created):
      directory.rmdir()


def write_metrics(path: str, history: list[dict]) -> None:
  """Writes one JSON line per epoch to `path` (through a symbolic link to
  its target), atomically: a reader sees the old file or the new one."""
  target = os.path.realpath(path)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  temporary = target + ".tmp"
  with open(temporary, "w") as handle:
    for row in history:
      handle.write(json.dumps(row) + "\n")
  os.replace(temporary, target)
