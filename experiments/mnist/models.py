"""The tutorial's MNIST models, one per layer kind."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax.numpy as jnp
from flax import nnx

import jaxdeq
from experiments.common import layers
from jaxdeq.nnx import DEQ, TanhCell

class Layer(NamedTuple):
  """One of the tutorial's MNIST equilibrium layers.

  Attributes:
    solver: the forward solver.
    adjoint: how gradients are computed.
    deq_kwargs: further `DEQ` arguments.
    epochs: the tutorial's epoch count for it.
    skip_grad_norm: the default `--skip-grad-norm` (None: only the NaN
      guard). Backprop through a long Newton trajectory can explode
      (docs/guide.md), and an implicit gradient at a sample Newton left
      unconverged is not a gradient: those layers undo such updates.
  """

  solver: jaxdeq.FixedPointSolver
  adjoint: jaxdeq.AbstractAdjoint
  deq_kwargs: dict
  epochs: int
  skip_grad_norm: Optional[float] = None


# The Newton layers solve each Newton system matrix-free by GMRES (Newton
# still stops at tol 1e-4, in about the same steps); the `_dense` layers are
# the tutorial's exact algorithm (batched LU with the closed-form Jacobian).
# The fixed_point layer solves in compacted phases (`DEQ(compact=True)`: the
# same iterates and gradients, without the converged samples' cost).
_NEWTON_GMRES = jaxdeq.Newton(tol=1e-4, max_steps=40, linear_solver=jaxdeq.GMRES(
    tol=1e-3, krylov_dim=10, max_restarts=0))
_NEWTON_DENSE = jaxdeq.Newton(tol=1e-4, max_steps=40)
LAYERS = {
    "fixed_point": Layer(
        jaxdeq.FixedPointIteration(tol=1e-4, max_steps=200),
        jaxdeq.UnrolledAdjoint(), dict(compact=True), epochs=10),
    "newton": Layer(
        _NEWTON_GMRES, jaxdeq.UnrolledAdjoint(),
        dict(z_init=jnp.tanh, unconverged="zero"), epochs=8,
        skip_grad_norm=100.0),
    # The backward system by one GMRES solve to the forward's tolerance.
    "newton_implicit": Layer(
        _NEWTON_GMRES,
        jaxdeq.ImplicitAdjoint(linear_solver=jaxdeq.GMRES(tol=1e-4, max_restarts=1)),
        dict(z_init=jnp.tanh), epochs=10, skip_grad_norm=100.0),
    "newton_dense": Layer(
        _NEWTON_DENSE, jaxdeq.UnrolledAdjoint(),
        dict(z_init=jnp.tanh, unconverged="zero"), epochs=8,
        skip_grad_norm=100.0),
    "newton_implicit_dense": Layer(
        _NEWTON_DENSE, jaxdeq.ImplicitAdjoint(), dict(z_init=jnp.tanh),
        epochs=10),
    "deq": Layer(
        jaxdeq.Anderson(tol=1e-4, max_steps=50, m=5, lam=1e-4),
        jaxdeq.ImplicitAdjoint(), {}, epochs=10),
}


def get_layer(name: str) -> Layer:
  """The layer called `name`; a ValueError naming the choices otherwise."""
  if name not in LAYERS:
    raise ValueError(f"unknown --layer {name!r}; choose one of"
                     f" {', '.join(LAYERS)}")
  return LAYERS[name]


def make_deq(layer: str, rngs: nnx.Rngs,
             options: Optional[layers.DeqOptions] = None) -> DEQ:
  """The equilibrium layer (width 100) of `layer`, with `options`."""
  options = options or layers.DeqOptions()
  solver, adjoint, kwargs = get_layer(layer)[:3]
  if options.record_steps or options.dropout:
    # Fixed-point correction and one dropout mask per sample need the whole
    # batch in every step: no compaction with them.
    kwargs = {k: v for k, v in kwargs.items() if k != "compact"}
  cell = options.cell(TanhCell(100, rngs=rngs), rngs)
  return DEQ(cell, solver, adjoint, **kwargs, **options.deq_kwargs(rngs))


def make_model(layer: str, rngs: nnx.Rngs,
               options: Optional[layers.DeqOptions] = None) -> nnx.Sequential:
  """784 -> 100 linear, the equilibrium layer (width 100), 100 -> 10 linear."""
  get_layer(layer)
  return nnx.Sequential(layers.linear(784, 100, rngs),
                        make_deq(layer, rngs, options),
                        layers.linear(100, 10, rngs))


def forward(model: nnx.Sequential, inputs, warm=None):
  """(logits, logits of the correction states, z*) of a batch."""
  x = model.layers[0](inputs)
  deq = model.layers[1]
  sol = deq.solve(x, z0=layers.warm_start_z0(deq, x, warm))
  head = model.layers[2]
  return head(sol.value), [head(s) for s in sol.states or ()], sol.value
