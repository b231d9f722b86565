"""The entry point's own cost: eager calls, and jitted forward+backward steps.

    python -m benchmarks.entry_point [--repeats 20] [--record]

Prints (1) the wall time of an eager `jaxdeq.fixed_point` call and an eager
`deq(x)` after the first (which compiles), and (2) median milliseconds of a
jitted forward+backward step of the tutorial's layers. It uses only API
that every jaxdeq release has, and names the jaxdeq it imported (version and
location): to compare two versions, run it in an environment with each one
installed (`pip install jaxdeq==VERSION`, or `pip install -e` of a checkout)
and compare the tables.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

import jaxdeq
from benchmarks import _results
from jaxdeq.nnx import DEQ, ResNetCell, TanhCell


def median_ms(fn, *args, repeats: int) -> float:
  return 1e3 * _results.median_seconds(fn, *args, repeats=repeats)


def eager_rows(repeats: int) -> list[list]:
  w = 0.1 * jnp.eye(32)
  z0 = jnp.ones((16, 32))
  tanh = lambda z, w: jnp.tanh(z @ w)
  solve = lambda z0: jaxdeq.fixed_point(tanh, z0, w).value
  deq = DEQ(TanhCell(32, rngs=nnx.Rngs(0)))
  return [
      ["eager fixed_point, 16x32 Anderson", f"{median_ms(solve, z0, repeats=repeats):.2f}"],  # noqa: E501
      ["eager deq(x), TanhCell(32), batch 16", f"{median_ms(deq, z0, repeats=repeats):.2f}"],  # noqa: E501
  ]


def step_ms(deq: DEQ, x: jax.Array, repeats: int) -> float:
  @nnx.jit
  def step(deq, x):
    return nnx.grad(lambda deq, x: jnp.sum(jnp.sin(deq(x))))(deq, x)

  return median_ms(step, deq, x, repeats=repeats)


def step_rows(repeats: int) -> list[list]:
  rngs = nnx.Rngs(0)
  x = jax.random.normal(jax.random.key(1), (100, 100))
  x_conv = jax.random.normal(jax.random.key(2), (10, 32, 32, 48))
  layers = [
      ("TanhCell(100), Anderson, implicit, batch 100",
       DEQ(TanhCell(100, rngs=rngs),
           jaxdeq.Anderson(tol=1e-4, max_steps=50, lam=1e-4),
           jaxdeq.ImplicitAdjoint()), x),
      ("TanhCell(100), iteration, unrolled, batch 100",
       DEQ(TanhCell(100, rngs=rngs),
           jaxdeq.FixedPointIteration(tol=1e-4, max_steps=200),
           jaxdeq.UnrolledAdjoint()), x),
      ("TanhCell(100), dense Newton, implicit, batch 100",
       DEQ(TanhCell(100, rngs=rngs), jaxdeq.Newton(tol=1e-4, max_steps=40),
           jaxdeq.ImplicitAdjoint(), z_init=jnp.tanh), x),
      ("ResNetCell(48, 64), Anderson, implicit, batch 10",
       DEQ(ResNetCell(48, 64, rngs=rngs),
           jaxdeq.Anderson(tol=1e-2, max_steps=25, m=5,
                                   lam=1e-4, lam_relative=False),
           jaxdeq.ImplicitAdjoint()), x_conv),
  ]
  return [[name, f"{step_ms(deq, x, repeats):.2f}"]
          for name, deq, x in layers]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--record", action="store_true",
                      help="append the table to benchmarks/RESULTS.md")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  rows = eager_rows(args.repeats) + step_rows(args.repeats)
  body = (f"jaxdeq {jaxdeq.__version__} at {jaxdeq.__file__}\n\n"
          + _results.markdown_table(["what", "median ms"], rows))
  _results.report(body, record=args.record,
                  title="Entry point: eager calls and fwd+bwd steps",
                  module="entry_point", argv=argv)


if __name__ == "__main__":
  main()
