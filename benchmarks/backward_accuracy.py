"""How far the cheaper backwards are from the implicit gradient, and their cost.

python -m benchmarks.backward_accuracy [--repeats 5] [--record]

For a tanh cell (TanhCell(100), its kernel scaled x2 so that rho(df/dz) at
z* is like a trained MNIST layer's: mean 0.77, max 1.01 over the batch;
x3 and more do not converge forward, batch 100) and the tutorial's ResNet cell
(ResNetCell(48, 64), batch 4, 32x32), all solved forward by the same
Broyden (so z* is the same), each backward's parameter gradient is compared
with the implicit one (ImplicitAdjoint with a tight backward tolerance):
relative error ||g - g_implicit|| / ||g_implicit||, cosine similarity, and
the median time of one jitted forward + backward step.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

import jaxdeq
from benchmarks import _results
from jaxdeq.nnx import DEQ, ResNetCell, TanhCell

BACKWARDS = {
    "implicit (reference)": jaxdeq.ImplicitAdjoint(
        linear_solver=jaxdeq.Broyden(tol=1e-7, max_steps=200, memory=30)),
    "implicit (forward's settings)": jaxdeq.ImplicitAdjoint(),
    "phantom, 5 steps, damping 0.5": jaxdeq.PhantomAdjoint(5, 0.5),
    "Neumann, 8 terms": jaxdeq.NeumannAdjoint(terms=8),
    "Neumann, 20 terms": jaxdeq.NeumannAdjoint(terms=20),
    "SHINE, no fallback": jaxdeq.SHINEAdjoint(fallback_tol=float("inf")),
    "SHINE, fallback at 0.1": jaxdeq.SHINEAdjoint(fallback_tol=0.1),
}


def _problems():
  tanh = TanhCell(100, rngs=nnx.Rngs(0))
  tanh.kernel.set_value(tanh.kernel[...] * 2.0)
  x_tanh = jax.random.normal(jax.random.key(1), (100, 100))
  resnet = ResNetCell(48, 64, rngs=nnx.Rngs(0))
  x_resnet = jax.random.normal(jax.random.key(2), (4, 32, 32, 48))
  return [("TanhCell(100) x2, batch 100", tanh, x_tanh,
           jaxdeq.Broyden(tol=1e-5, max_steps=60, memory=30)),
          ("ResNetCell(48, 64), batch 4", resnet, x_resnet,
           jaxdeq.Broyden(tol=1e-4, max_steps=40, memory=30))]


def _grad_fn(cell, solver, adjoint):
  graphdef, params, rest = nnx.split(DEQ(cell, solver, adjoint), nnx.Param,
                                     ...)
  target = jax.random.normal(jax.random.key(3), ())

  @jax.jit
  def grad(params, x):
    def loss(params):
      z = nnx.merge(graphdef, params, rest, copy=True)(x)
      return jnp.mean(jnp.sin(z + target))
    return jax.grad(loss)(params)

  return grad, params


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.backward_accuracy")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args(argv)
  flat = lambda g: jnp.concatenate([v.ravel() for v in jax.tree.leaves(g)])
  rows = []
  for problem, cell, x, solver in _problems():
    reference = None
    for name, adjoint in BACKWARDS.items():
      grad, params = _grad_fn(cell, solver, adjoint)
      g = flat(grad(params, x))
      if reference is None:
        reference = g
      error = float(jnp.linalg.norm(g - reference)
                    / jnp.linalg.norm(reference))
      cosine = float(jnp.vdot(g, reference)
                     / (jnp.linalg.norm(g) * jnp.linalg.norm(reference)))
      ms = 1e3 * _results.median_seconds(grad, params, x,
                                         repeats=args.repeats)
      rows.append([problem, name, f"{error:.2e}", f"{cosine:.5f}",
                   f"{ms:.1f}"])
      print(rows[-1], flush=True)
  body = _results.markdown_table(
      ["problem", "backward", "relative error vs implicit", "cosine",
       "fwd+bwd ms"], rows)
  _results.report(body, record=args.record,
                  title="Cheaper backwards against the implicit gradient",
                  module="backward_accuracy", argv=argv)


if __name__ == "__main__":
  main()
