"""Command-line flags shared by the experiments."""

from __future__ import annotations

import argparse


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
                      " NaN guard; 100 for the unrolled Newton MNIST layers)")
  parser.add_argument("--no-progress", action="store_true",
                      help="no tqdm progress bar")
