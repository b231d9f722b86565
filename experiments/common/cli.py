"""Command-line flags shared by the experiments."""

from __future__ import annotations

import argparse

from experiments.common import layers


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
  """The DEQ stabilisers (see README, "Training a DEQ that stays stable")."""
  group = parser.add_argument_group("DEQ stabilisers")
  group.add_argument("--jacobian-penalty", type=_non_negative, default=0.0,
                     metavar="W", help="add W x the Hutchinson estimate of"
                     " ||df/dz||_F^2 / d at z* to the loss (Bai et al. 2021)")
  group.add_argument("--fp-correction", type=_steps, default=(),
                     metavar="K1,K2", help="also supervise the iterates after"
                     " these solver steps (fixed-point correction)")
  group.add_argument("--fp-weight", type=_weights, default=(1.0,),
                     metavar="W[,W2,...]", help="loss weight of the"
                     " correction iterates: one for all, or one per step of"
                     " --fp-correction")
  norm = group.add_mutually_exclusive_group()
  norm.add_argument("--weight-norm", action="store_true",
                    help="weight-normalise the cell's kernels")
  norm.add_argument("--spectral-norm", action="store_true",
                    help="spectrally normalise the cell's kernels")
  group.add_argument("--dropout", type=_rate, default=0.0, metavar="P",
                     help="variational dropout on the cell's output, one"
                     " mask per solve")
  group.add_argument("--warm-start", action="store_true",
                     help="start each training example's solve at its z*"
                     " from the previous epoch")
  group.add_argument("--eval-max-steps", type=positive_int, default=None,
                     help="the solver's step cap at evaluation")


def deq_options(args: argparse.Namespace) -> layers.DeqOptions:
  """The `DeqOptions` of parsed DEQ flags."""
  return layers.DeqOptions(
      jacobian_penalty=args.jacobian_penalty,
      record_steps=args.fp_correction,
      normalization=("weight" if args.weight_norm else
                     "spectral" if args.spectral_norm else None),
      dropout=args.dropout, eval_max_steps=args.eval_max_steps)


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
