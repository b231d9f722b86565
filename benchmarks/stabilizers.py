"""The DEQ stabilisers on Fashion-MNIST: what each does to a training run.

python -m benchmarks.stabilizers [--runs deq deq_penalty ...] [--epochs 4]
    [--limit-train N] [--data-dir DIR] [--record]

Each run trains the tutorial's MNIST model (experiments.mnist) with one set
of flags and reports the last epoch's forward steps per batch, the spectral
radius of df/dz at z* (mean and max over a test batch), the penalty
estimate ||df/dz||_F^2 / d, the test error and the updates the gradient
guard skipped. Runs (flags as on the command line):

  deq                 --layer deq
  deq_penalty         --layer deq --jacobian-penalty 1
  deq_warm            --layer deq --warm-start
  newton              --layer newton (guard at 100, the default)
  newton_unguarded    --layer newton --skip-grad-norm 1e30 (no norm guard)
  newton_penalty      --layer newton --jacobian-penalty 1 --skip-grad-norm 1e30
  newton_implicit     --layer newton_implicit
  newton_implicit_penalty  --layer newton_implicit --jacobian-penalty 1

With --record the table is appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import _results
from experiments.common import layers, training
from experiments.mnist import models as mnist_models
from experiments.mnist import train as mnist_train

RUNS = {
    "deq": ("deq", {}),
    "deq_penalty": ("deq", dict(jacobian_penalty=1.0)),
    "deq_warm": ("deq", dict(warm_start=True)),
    "newton": ("newton", {}),
    "newton_unguarded": ("newton", dict(skip_grad_norm=1e30)),
    "newton_penalty": ("newton", dict(jacobian_penalty=1.0,
                                      skip_grad_norm=1e30)),
    "newton_implicit": ("newton_implicit", {}),
    "newton_implicit_penalty": ("newton_implicit",
                                dict(jacobian_penalty=1.0)),
}


def run(name: str, epochs: int, data_dir: str, limit_train, seed: int):
  layer, flags = RUNS[name]
  flags = dict(flags)
  options = layers.DeqOptions(jacobian_penalty=flags.pop("jacobian_penalty",
                                                         0.0))
  skip = flags.pop("skip_grad_norm",
                   mnist_models.LAYERS[layer].skip_grad_norm)
  config = training.Config(
      dataset="fashion_mnist", data_dir=data_dir, epochs=epochs,
      batch_size=100, seed=seed, limit_train=limit_train, progress=False,
      skip_grad_norm=skip, deq_options=options, **flags)
  started = time.perf_counter()
  history = mnist_train.train_and_evaluate(config, layer)
  return history, time.perf_counter() - started


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.stabilizers")
  parser.add_argument("--runs", nargs="+", default=list(RUNS),
                      choices=list(RUNS))
  parser.add_argument("--epochs", type=int, default=4)
  parser.add_argument("--limit-train", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args(argv)

  rows = []
  for name in args.runs:
    history, seconds = run(name, args.epochs, args.data_dir, args.limit_train,
                           args.seed)
    last = history[-1]
    rows.append([
        name,
        " / ".join(f"{r['forward_steps']:.1f}" for r in history),
        f"{last['spectral_radius']:.3f} / {last['spectral_radius_max']:.3f}",
        f"{last['jacobian_penalty']:.4f}",
        f"{100 * last['test_error']:.2f}",
        sum(r["skipped_steps"] for r in history),
        f"{last['train_seconds']:.1f}",
        f"{seconds:.0f}",
    ])
  header = ["run", "forward steps per batch, epoch 1 / 2 / ...",
            "rho mean / max (last)", "||J||_F^2/d (last)", "test error %",
            "skipped updates", "last epoch s", "run s"]
  body = _results.markdown_table(header, rows)
  _results.report(body, record=args.record,
                  title=f"Stabilisers on Fashion-MNIST, {args.epochs} epochs",
                  module="stabilizers", argv=argv)


if __name__ == "__main__":
  main()
