"""Command-line flags shared by the experiments."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got"
                                     f" {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got"
                                     f" {value}")
  return value


def positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive number, got"
                                     f" {text!r}") from None
  if not value > 0:
    raise argparse.ArgumentTypeError(f"expected a positive number, got"
                                     f" {value}")
  return value


def add_common_flags(parser: argparse.ArgumentParser, epochs_help: str,
                     ) -> None:
  parser.add_argument("--data-dir", default=None,
                      help="offline data: IDX files / CIFAR-10 python batches /"
                      " a prepared tensorflow-datasets directory")
  parser.add_argument("--epochs", type=positive_int, default=None,
                      help=epochs_help)
  parser.add_argument("--batch-size", type=positive_int, default=100)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--metrics-out", default=None,
                      help="write one JSON line of metrics per epoch here")
  parser.add_argument("--workdir", default=None,
                      help="orbax checkpoints; a rerun resumes from here")
  parser.add_argument("--plots", default=None,
                      help="write residual and training-curve PNGs here")
  parser.add_argument("--limit-train", type=positive_int, default=None,
                      help="use only the first N training examples")
  parser.add_argument("--limit-test", type=positive_int, default=None,
                      help="use only the first N test examples")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() (multi-host)")
  parser.add_argument("--skip-grad-norm", type=positive_float, default=None,
                      help="also undo updates whose gradient norm exceeds"
                      " this (default: only non-finite ones, the tutorial's"
                      " NaN guard)")
  parser.add_argument("--no-progress", action="store_true",
                      help="no tqdm progress bar")
