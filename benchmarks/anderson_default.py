"""The default Anderson against the tutorial's settings and plain iteration.

python -m benchmarks.anderson_default [--rounds 5] [--quick] [--record]

For each problem: solver steps (the batch's) and the median time of a jitted
forward+backward (gradient of sum(z*) with respect to the map's parameters,
implicit adjoint), the three solvers timed in alternating rounds. Problems:
the tutorial's MNIST tanh layer shape (`TanhCell(100)`, batch 100, tol 1e-4,
50 steps), the README's map (batch 32, tol 1e-4) and the ResNet DEQ cell
(`ResNetCell(48, 64)`, batch 10, 16x16, tol 1e-2, 25 steps).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

import jaxdeq
from benchmarks import _results
from jaxdeq.nnx import ResNetCell, TanhCell


def cell_problem(cell, x):
  graphdef, state = nnx.split(cell)
  return (lambda z, p: nnx.merge(graphdef, p[0])(z, p[1])), (state, x)


def problems(quick: bool):
  x = jax.random.normal(jax.random.key(1), (100, 100))
  yield "MNIST tanh layer, B=100", cell_problem(
      TanhCell(100, rngs=nnx.Rngs(0)), x), 1e-4, 50
  w = 0.1 * jax.random.normal(jax.random.key(0), (100, 100))
  x = jax.random.normal(jax.random.key(1), (32, 100))
  yield "README map, B=32", ((lambda z, a: jnp.tanh(z @ a[0] + a[1])),
                             (w, x)), 1e-4, 50
  if not quick:
    x = jax.random.normal(jax.random.key(2), (10, 16, 16, 48))
    yield "ResNet cell, B=10 16x16x48", cell_problem(
        ResNetCell(48, 64, rngs=nnx.Rngs(0)), x), 1e-2, 25


def solvers(tol, max_steps):
  return {
      "plain iteration": jaxdeq.FixedPointIteration(tol, max_steps),
      "Anderson, tutorial (lam=1e-4 absolute)": jaxdeq.Anderson(
          tol, max_steps, m=5, lam=1e-4, lam_relative=False),
      "Anderson, default": jaxdeq.Anderson(tol, max_steps),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--quick", action="store_true",
                      help="the small problems only (a smoke run)")
  parser.add_argument("--record", action="store_true",
                      help="append the table to benchmarks/RESULTS.md")
  args = parser.parse_args(argv)
  rows = []
  for name, (f, params), tol, max_steps in problems(args.quick):
    z0 = jnp.zeros_like(params[1])
    calls, steps = {}, {}
    for label, solver in solvers(tol, max_steps).items():
      def loss(p, solver=solver):
        sol = jaxdeq.fixed_point(f, z0, p, solver=solver)
        return jnp.sum(sol.value), sol.stats.num_steps

      step = jax.jit(jax.grad(loss, has_aux=True))
      steps[label] = int(step(params)[1])
      calls[label] = lambda step=step: jax.block_until_ready(step(params))
    medians = _results.interleaved_medians(calls, repeats=5 * args.rounds,
                                           rounds=args.rounds)
    for label in calls:
      rows.append([name, label, steps[label],
                   f"{medians[label] * 1e3:.2f}"])
      print(rows[-1], flush=True)
  body = _results.markdown_table(
      ["problem", "solver", "steps", "fwd+bwd ms (median, alternating)"],
      rows)
  _results.report(body, record=args.record, module="anderson_default",
                  argv=argv, title="Default Anderson vs the tutorial's"
                  " settings and plain iteration")


if __name__ == "__main__":
  main()
