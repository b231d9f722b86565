"""python -m experiments.cifar10 [--model mdeq_small] [--data-dir DIR] ..."""

from __future__ import annotations

import argparse
import sys

from experiments.cifar10 import train
from experiments.common import cli, data, training


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.cifar10",
      description="The Deep Implicit Layers tutorial's CIFAR-10 DEQ in jaxdeq.")
  parser.add_argument("--model", default="deq_resnet",
                      choices=["deq_resnet", "mdeq_small"],
                      help="the tutorial's ResNet-cell DEQ, or MDEQ-small"
                      " (two resolutions, a MultiscaleCell)")
  parser.add_argument("--dataset", default="cifar10",
                      choices=["cifar10", "fashion_mnist", "mnist"],
                      help="CIFAR-10, or MNIST-format images (1 channel,"
                      " 28x28; Fashion-MNIST is installed by Debian's"
                      " dataset-fashion-mnist)")
  cli.add_common_flags(parser, "epochs (default 50, the tutorial's)")
  cli.add_deq_flags(parser)
  args = parser.parse_args(argv)
  config = training.Config(
      dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs or 50,
      batch_size=args.batch_size, seed=args.seed,
      metrics_out=args.metrics_out, workdir=args.workdir, plots=args.plots,
      limit_train=args.limit_train, limit_test=args.limit_test,
      distributed=args.distributed, progress=not args.no_progress,
      deq_options=cli.deq_options(args), fp_weight=args.fp_weight,
      warm_start=args.warm_start,
      skip_grad_norm=args.skip_grad_norm)
  try:
    train.train_and_evaluate(config, args.model)
  except (data.DataError, ValueError) as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  main()
