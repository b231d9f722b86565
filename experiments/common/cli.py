"""Command-line flags shared by the experiments.

A run's settings are a `training.Config`: the `get_config()` of a config
module (`--config FILE`, default the experiment's `configs/default.py`), then
every flag given on the command line overrides its field. Flags have no
defaults of their own (argparse.SUPPRESS), so that a flag left out keeps the
config's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex
import sys
from pathlib import Path
from typing import Callable

from experiments.common import data, training


def _positive(convert, kind: str):
  """An argparse type: `convert(text)`, which must be > 0 (and finite)."""

  def parse(text: str):
    try:
      value = convert(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a positive {kind}, got"
                                       f" {text!r}") from None
    if not 0 < value < float("inf"):
      raise argparse.ArgumentTypeError(f"expected a positive {kind}, got"
                                       f" {value}")
    return value

  return parse


positive_int = _positive(int, "integer")
positive_float = _positive(float, "number")


def _steps(text: str) -> tuple[int, ...]:
  """"5,10" -> (5, 10): increasing positive step counts."""
  try:
    steps = tuple(int(part) for part in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected step counts like 5,10, got {text!r}") from None
  if any(k < 1 for k in steps) or list(steps) != sorted(set(steps)):
    raise argparse.ArgumentTypeError(
        f"expected increasing positive step counts, got {text!r}")
  return steps


def _weights(text: str) -> tuple[float, ...]:
  """"0.5" or "0.3,0.6" -> positive loss weights."""
  try:
    weights = tuple(float(part) for part in text.split(","))
  except ValueError:
    weights = ()
  if not weights or not all(0 < w < float("inf") for w in weights):
    raise argparse.ArgumentTypeError(
        f"expected positive weights like 0.5 or 0.3,0.6, got {text!r}")
  return weights


def _number_in(low: float, high: float, kind: str):
  """An argparse type: a float with low <= value < high."""

  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      value = float("nan")
    if not low <= value < high:
      raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}")
    return value

  return parse


_rate = _number_in(0.0, 1.0, "a rate in [0, 1)")
_non_negative = _number_in(0.0, float("inf"), "a number >= 0")


def add_deq_flags(parser: argparse.ArgumentParser) -> None:
  """The DEQ stabilisers (see docs/stability.md)."""
  group = parser.add_argument_group(
      "DEQ stabilisers", argument_default=argparse.SUPPRESS)
  group.add_argument("--jacobian-penalty", type=_non_negative,
                     metavar="W", help="add W x the Hutchinson estimate of"
                     " ||df/dz||_F^2 / d at z* to the loss (Bai et al. 2021)")
  group.add_argument("--fp-correction", type=_steps,
                     metavar="K1,K2", help="also supervise the iterates after"
                     " these solver steps (fixed-point correction)")
  group.add_argument("--fp-weight", type=_weights,
                     metavar="W[,W2,...]", help="loss weight of the"
                     " correction iterates: one for all, or one per step of"
                     " --fp-correction")
  norm = group.add_mutually_exclusive_group()
  norm.add_argument("--weight-norm", action="store_true",
                    help="weight-normalise the cell's kernels")
  norm.add_argument("--spectral-norm", action="store_true",
                    help="spectrally normalise the cell's kernels")
  group.add_argument("--dropout", type=_rate, metavar="P",
                     help="variational dropout on the cell's output, one"
                     " mask per solve")
  group.add_argument("--warm-start", action="store_true",
                     help="start each training example's solve at its z*"
                     " from the previous epoch")
  group.add_argument("--eval-max-steps", type=positive_int,
                     help="the solver's step cap at evaluation")


def add_common_flags(parser: argparse.ArgumentParser, epochs_help: str,
                     ) -> None:
  """Data, schedule, output and cluster flags, and `--config`."""
  add = parser.add_argument
  add("--config", default=None, metavar="FILE",
      help="a Python file whose get_config() returns the run's settings (a"
      " training.Config; default: this experiment's configs/default.py);"
      " the flags below override it")
  add("--data-dir", default=argparse.SUPPRESS,
      help="offline data: IDX files / CIFAR-10 python batches / a prepared"
      " tensorflow-datasets directory")
  add("--epochs", type=positive_int, default=argparse.SUPPRESS,
      help=epochs_help)
  add("--batch-size", type=positive_int, default=argparse.SUPPRESS,
      help="global batch size, split over every device (default 100)")
  add("--seed", type=int, default=argparse.SUPPRESS)
  add("--metrics-out", default=argparse.SUPPRESS,
      help="write one JSON line of metrics per epoch here")
  add("--workdir", default=argparse.SUPPRESS,
      help="orbax checkpoints; a rerun resumes from here")
  add("--plots", default=argparse.SUPPRESS,
      help="write residual and training-curve PNGs here")
  add("--limit-train", type=positive_int, default=argparse.SUPPRESS,
      help="use only the first N training examples")
  add("--limit-test", type=positive_int, default=argparse.SUPPRESS,
      help="use only the first N test examples")
  add("--skip-grad-norm", type=positive_float, default=argparse.SUPPRESS,
      help="also undo updates whose gradient norm exceeds this (default:"
      " only non-finite ones, the tutorial's NaN guard; 100 for the MNIST"
      " layers newton, newton_dense and newton_implicit)")
  add("--no-progress", action="store_true", default=argparse.SUPPRESS,
      help="no tqdm progress bar")
  cluster = parser.add_argument_group(
      "multi-process data parallel (see docs/experiments.md, \"Several"
      " processes\")",
      argument_default=argparse.SUPPRESS)
  cluster.add_argument(
      "--distributed", action="store_true",
      help="call jax.distributed.initialize(): one process per host (or per"
      " accelerator), the batch split over every device of every process")
  cluster.add_argument(
      "--coordinator-address", metavar="HOST:PORT",
      help="process 0's address (default: from the cluster's environment,"
      " e.g. SLURM, or JAX_COORDINATOR_ADDRESS)")
  cluster.add_argument("--num-processes", type=positive_int,
                       help="how many processes take part")
  cluster.add_argument("--process-id", type=int,
                       help="this process's index, 0 to --num-processes - 1")


def load_config(path: str) -> training.Config:
  """The `training.Config` of a config file's `get_config()`."""
  file = Path(path)
  if not file.is_file():
    raise ValueError(f"--config {path}: no such file")
  if file.suffix != ".py":
    raise ValueError(f"--config {path}: a config is a Python file (.py)"
                     " whose get_config() returns a training.Config, as in"
                     " experiments/mnist/configs/default.py")
  spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as error:  # the user's file: say which one failed
    raise ValueError(f"--config {path} failed to load: {error!r}") from error
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ValueError(f"--config {path} defines no get_config()")
  config = get_config()
  if not isinstance(config, training.Config):
    raise ValueError(f"--config {path}: get_config() returned a"
                     f" {type(config).__name__}, not a training.Config")
  return config


# Flags whose values go to `DeqOptions` fields of the same name, or another.
_DEQ_FIELDS = {"jacobian_penalty": "jacobian_penalty",
               "fp_correction": "record_steps", "dropout": "dropout",
               "eval_max_steps": "eval_max_steps"}


def config_from_args(args: argparse.Namespace,
                     default: training.Config) -> training.Config:
  """`--config`'s (else `default`'s) settings with the flags given."""
  base = load_config(args.config) if args.config else default
  given = {k: v for k, v in vars(args).items() if k != "config"}
  fields = {field.name for field in dataclasses.fields(training.Config)}
  overrides = {k: v for k, v in given.items() if k in fields}
  if given.get("no_progress"):
    overrides["progress"] = False
  deq = {field: given[flag] for flag, field in _DEQ_FIELDS.items()
         if flag in given}
  if given.get("weight_norm"):
    deq["normalization"] = "weight"
  if given.get("spectral_norm"):
    deq["normalization"] = "spectral"
  if deq:
    overrides["deq_options"] = base.deq_options._replace(**deq)
  return dataclasses.replace(base, **overrides)


def run(train: Callable[[], object], config: training.Config,
        argv: list[str]) -> None:
  """Runs `train()` for a command line: a data or settings error is one line
  (exit 1), and Ctrl-C one line that says what was saved and how to resume
  (exit 130; the workdir stays resumable)."""
  try:
    train()
  except (data.DataError, ValueError) as error:
    sys.exit(f"error: {error}")
  except KeyboardInterrupt:
    print(interrupted_message(config, argv), file=sys.stderr, flush=True)
    sys.stdout.flush()
    # No interpreter teardown: XLA's threads may still be compiling or
    # running the interrupted step, and tearing down under them can crash.
    # Nothing is left to write: checkpoints hold Ctrl-C until they are done.
    os._exit(130)


def interrupted_message(config: training.Config, argv: list[str]) -> str:
  """What an interrupted run left behind, and the command that resumes it."""
  if not config.workdir:
    return ("interrupted: nothing saved (no --workdir); give --workdir DIR to"
            " make a run resumable")
  saved = _saved_epochs(Path(config.workdir) / "checkpoints")
  command = shlex.join(["python", "-m", *argv])
  if not saved:
    return (f"interrupted before the first epoch was saved in"
            f" {config.workdir}; rerun to start again: {command}")
  return (f"interrupted: epochs 1-{max(saved)} are saved in {config.workdir};"
          f" resume with: {command}")


def _saved_epochs(directory: Path) -> list[int]:
  """The epochs orbax finished writing (a step's directory is renamed to
  its number only once complete)."""
  if not directory.is_dir():
    return []
  return [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
