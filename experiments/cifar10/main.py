"""python -m experiments.cifar10 [--config FILE] [--model MODEL] [flags]"""

from __future__ import annotations

import argparse
import sys

from experiments.cifar10 import train
from experiments.cifar10.configs import default
from experiments.common import cli, training, xla_cpu


def parse_config(argv=None) -> training.Config:
  """The run's `training.Config`: the config module's, then the flags."""
  return _parse(argv)[0]


def _parse(argv=None) -> tuple[training.Config, bool]:
  """(the run's config, whether to keep XLA's default CPU options)."""
  parser = argparse.ArgumentParser(
      prog="python -m experiments.cifar10",
      description="The Deep Implicit Layers tutorial's CIFAR-10 DEQ in jaxdeq.",
      epilog="Settings not given as flags come from --config (default:"
      " experiments/cifar10/configs/default.py).")
  parser.add_argument("--model", choices=list(train.models.MODELS),
                      default=argparse.SUPPRESS,
                      help="the tutorial's ResNet-cell DEQ (deq_resnet, the"
                      " default), or MDEQ-small (two resolutions, a"
                      " MultiscaleCell)")
  parser.add_argument("--dataset", choices=list(train.DATASETS),
                      default=argparse.SUPPRESS,
                      help="CIFAR-10 (default), or MNIST-format images (1"
                      " channel, 28x28; Fashion-MNIST is installed by Debian's"
                      " dataset-fashion-mnist)")
  parser.add_argument("--xla-defaults", action="store_true",
                      help="compile with XLA's default CPU options (by"
                      " default a run keeps XLA:CPU's YNNPACK fusions for"
                      " reductions only and turns on region-based copy"
                      " insertion; RESULTS.md has the speed-ups;"
                      " experiments/common/xla_cpu.py)")
  cli.add_common_flags(parser, "epochs (default 50, the tutorial's)")
  cli.add_deq_flags(parser)
  args = parser.parse_args(argv)
  try:
    return (cli.config_from_args(args, default.get_config()),
            args.xla_defaults)
  except ValueError as error:
    parser.error(str(error))


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  config, xla_defaults = _parse(argv)
  if not xla_defaults:
    xla_cpu.use_conv_flags()
  cli.run(lambda: train.train_and_evaluate(config), config,
          ["experiments.cifar10", *argv])


if __name__ == "__main__":
  main()
