"""Peak memory of one training step against solver steps, per adjoint.

python -m benchmarks.memory [--steps 10 25 50 100 200] [--record] [--plot FILE]

One SGD step of the tutorial's MNIST model (784 -> 100 -> tanh DEQ -> 10,
batch 100) with plain iteration forced to take exactly N steps (tol far below
reach). Memory is XLA's own analysis of the compiled step (temporaries +
arguments + outputs, CPU) or the device's peak after the step (GPU). The
unrolled adjoint with its default budget (a tape of VJP residuals for the
first steps, linear in steps up to the budget, checkpoints beyond) and with
checkpoints only (`memory_budget=0`, sqrt(max_steps)). "naive unrolled" is plain autodiff through
a `lax.scan` of N steps, the baseline that stores every step's residuals.
With --record the table is appended to RESULTS.md and the plot written to
benchmarks/memory.png (or --plot).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxdeq
from benchmarks import _results
from experiments.common import layers
from jaxdeq.nnx import DEQ, TanhCell

ADJOINTS = {
    "implicit": jaxdeq.ImplicitAdjoint,
    "phantom": jaxdeq.PhantomAdjoint,
    "unrolled (default 8 MiB tape)": jaxdeq.UnrolledAdjoint,
    "unrolled, checkpointed": lambda: jaxdeq.UnrolledAdjoint(memory_budget=0),
}


class NaiveUnrolled(nnx.Module):
  """Autodiff through a scan of exactly `steps` iterations (stores all)."""

  def __init__(self, steps: int, rngs: nnx.Rngs):
    self.cell = TanhCell(100, rngs=rngs)
    self.steps = steps

  def __call__(self, x):
    def body(z, _):
      return self.cell(z, x), None
    return jax.lax.scan(body, jnp.zeros_like(x), length=self.steps)[0]


def step_memory(layer: nnx.Module, batch: int = 100) -> int:
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(layers.linear(784, 100, rngs), layer,
                         layers.linear(100, 10, rngs))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  x = jnp.zeros((batch, 784))
  y = jnp.zeros((batch,), jnp.int32)

  def train_step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(
        m(x), y).mean()
    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer))

  compiled = jax.jit(train_step).lower(state, x, y).compile()
  if jax.devices()[0].platform == "gpu":
    jax.block_until_ready(compiled(state, x, y))
    return jax.devices()[0].memory_stats()["peak_bytes_in_use"]
  analysis = compiled.memory_analysis()
  return (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
          + analysis.output_size_in_bytes)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, nargs="+",
                      default=[10, 25, 50, 100, 200])
  parser.add_argument("--record", action="store_true",
                      help="append the table to benchmarks/RESULTS.md and"
                      " write the plot (default benchmarks/memory.png)")
  parser.add_argument("--plot", default=None,
                      help="write the plot here (default: only with --record)")
  args = parser.parse_args(argv)
  if args.record and args.plot is None:
    args.plot = "benchmarks/memory.png"
  kinds = list(ADJOINTS) + ["naive unrolled"]
  table = {k: [] for k in kinds}
  for steps in args.steps:
    solver = jaxdeq.FixedPointIteration(tol=1e-30, max_steps=steps)
    for name, adjoint in ADJOINTS.items():
      layer = DEQ(TanhCell(100, rngs=nnx.Rngs(0)), solver, adjoint())
      table[name].append(step_memory(layer))
    table["naive unrolled"].append(step_memory(NaiveUnrolled(steps,
                                                             nnx.Rngs(0))))
    print(steps, {k: v[-1] for k, v in table.items()}, flush=True)

  mib = lambda b: f"{b / 2**20:.2f}"
  rows = [[k] + [mib(v) for v in table[k]]
          + [f"{table[k][-1] / table[k][0]:.2f}x"] for k in kinds]
  body = _results.markdown_table(
      ["adjoint \\ solver steps (MiB)"] + [str(s) for s in args.steps]
      + [f"{args.steps[-1]} vs {args.steps[0]}"], rows)
  if args.plot:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for k in kinds:
      ax.plot(args.steps, [v / 2**20 for v in table[k]], "o-", label=k)
    ax.set_xlabel("solver steps taken")
    ax.set_ylabel("training-step memory (MiB)")
    ax.set_title("MNIST tanh DEQ, batch 100: memory vs steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    body += f"\n\n![memory vs steps]({args.plot.split('/')[-1]})"
  _results.report(body, record=args.record, module="memory", argv=argv,
                  title="Memory: one training step vs solver steps")


if __name__ == "__main__":
  main()
