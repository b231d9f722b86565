"""python -m experiments.mnist [--config FILE] [--layer LAYER] [flags]"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from experiments.common import cli, training
from experiments.mnist import models, train
from experiments.mnist.configs import default


def parse_config(argv=None) -> training.Config:
  """The run's `training.Config`: the config module's, then the flags."""
  parser = argparse.ArgumentParser(
      prog="python -m experiments.mnist",
      description="The Deep Implicit Layers tutorial's MNIST runs in jaxdeq.",
      epilog="Settings not given as flags come from --config (default:"
      " experiments/mnist/configs/default.py).")
  parser.add_argument("--layer", dest="model", choices=list(models.LAYERS),
                      default=argparse.SUPPRESS,
                      help="the equilibrium layer (default: deq)")
  parser.add_argument("--dataset", choices=["mnist", "fashion_mnist"],
                      default=argparse.SUPPRESS,
                      help="default: fashion_mnist")
  cli.add_common_flags(parser, "epochs (default: the tutorial's, 8 for"
                       " newton and newton_dense, 10 otherwise)")
  cli.add_deq_flags(parser)
  args = parser.parse_args(argv)
  try:
    config = cli.config_from_args(args, default.get_config())
  except ValueError as error:
    parser.error(str(error))
  try:
    layer = models.get_layer(config.model)
  except ValueError as error:  # a config file's model
    parser.error(str(error))
  if config.epochs is None:
    config = dataclasses.replace(config, epochs=layer.epochs)
  if config.skip_grad_norm is None:
    config = dataclasses.replace(config, skip_grad_norm=layer.skip_grad_norm)
  return config


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  config = parse_config(argv)
  cli.run(lambda: train.train_and_evaluate(config), config,
          ["experiments.mnist", *argv])


if __name__ == "__main__":
  main()
