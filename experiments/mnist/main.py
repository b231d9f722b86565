"""python -m experiments.mnist --layer {fixed_point,newton,newton_implicit,newton_gmres,newton_implicit_gmres,deq}"""

from __future__ import annotations

import argparse
import sys

from experiments.common import cli, data, training
from experiments.mnist import models, train


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.mnist",
      description="The Deep Implicit Layers tutorial's MNIST runs in jaxdeq.")
  parser.add_argument("--layer", required=True, choices=list(models.LAYERS))
  parser.add_argument("--dataset", default="fashion_mnist",
                      choices=["mnist", "fashion_mnist"])
  cli.add_common_flags(parser, "epochs (default: the tutorial's, 8 for"
                       " newton, 10 otherwise)")
  cli.add_deq_flags(parser)
  args = parser.parse_args(argv)
  config = training.Config(
      dataset=args.dataset, data_dir=args.data_dir,
      epochs=args.epochs or models.LAYERS[args.layer][3],
      batch_size=args.batch_size, seed=args.seed,
      metrics_out=args.metrics_out, workdir=args.workdir, plots=args.plots,
      limit_train=args.limit_train, limit_test=args.limit_test,
      distributed=args.distributed, progress=not args.no_progress,
      deq_options=cli.deq_options(args), fp_weight=args.fp_weight,
      warm_start=args.warm_start,
      skip_grad_norm=(args.skip_grad_norm if args.skip_grad_norm is not None
                      else models.UNROLLED_NEWTON_SKIP_GRAD_NORM.get(
                          args.layer)))
  try:
    train.train_and_evaluate(config, args.layer)
  except (data.DataError, ValueError) as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  main()
