"""The tutorial's MNIST models, one per layer kind."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import nnx

import jaxdeq
from experiments.common import layers
from jaxdeq.nnx import DEQ, TanhCell

# layer -> (solver, adjoint, DEQ keyword arguments, default epochs), as in the
# tutorial. The Newton layers solve each Newton system matrix-free by GMRES
# (Newton still stops at tol 1e-4, in the same ~5 steps; 7-9x faster per
# epoch than LU on this 100-wide cell, `python -m benchmarks.vs_pytorch`);
# the `_dense` layers are the tutorial's exact algorithm (batched LU with the
# closed-form Jacobian). The fixed_point layer solves in compacted phases
# (`DEQ(compact=True)`: the same iterates and gradients; its samples take
# 14.6 steps on average against the batch's 28, and the training step ran
# 1.2-1.3x faster, RESULTS.md).
_NEWTON_GMRES = jaxdeq.Newton(tol=1e-4, max_steps=40, linear_solver="gmres",
                              gmres_tol=1e-3, gmres_krylov_dim=10)
_NEWTON_DENSE = jaxdeq.Newton(tol=1e-4, max_steps=40)
LAYERS = {
    "fixed_point": (jaxdeq.FixedPointIteration(tol=1e-4, max_steps=200), jaxdeq.UnrolledAdjoint(), dict(compact=True), 10),  # noqa: E501
    "newton": (_NEWTON_GMRES, jaxdeq.UnrolledAdjoint(), dict(z_init=jnp.tanh, unconverged="zero"), 8),  # noqa: E501
    # The backward system by one GMRES solve to the forward's tolerance.
    "newton_implicit": (_NEWTON_GMRES, jaxdeq.ImplicitAdjoint(solver=jaxdeq.GMRES(tol=1e-4, max_restarts=1)), dict(z_init=jnp.tanh), 10),  # noqa: E501
    "newton_dense": (_NEWTON_DENSE, jaxdeq.UnrolledAdjoint(), dict(z_init=jnp.tanh, unconverged="zero"), 8),  # noqa: E501
    "newton_implicit_dense": (_NEWTON_DENSE, jaxdeq.ImplicitAdjoint(), dict(z_init=jnp.tanh), 10),  # noqa: E501
    "deq": (jaxdeq.Anderson(tol=1e-4, max_steps=50, m=5, lam=1e-4), jaxdeq.ImplicitAdjoint(), {}, 10),  # noqa: E501
}


# Backprop through a long Newton trajectory can explode (docs/guide.md): these
# layers' runs undo updates with gradient norm above this unless
# --skip-grad-norm says otherwise.
UNROLLED_NEWTON_SKIP_GRAD_NORM = {"newton": 100.0, "newton_dense": 100.0}


def make_deq(layer: str, rngs: nnx.Rngs,
             options: Optional[layers.DeqOptions] = None) -> DEQ:
  """The equilibrium layer (width 100) of `layer`, with `options`."""
  options = options or layers.DeqOptions()
  solver, adjoint, kwargs, _ = LAYERS[layer]
  if options.record_steps or options.dropout:
    # Fixed-point correction and one dropout mask per sample need the whole
    # batch in every step: no compaction with them.
    kwargs = {k: v for k, v in kwargs.items() if k != "compact"}
  cell = options.cell(TanhCell(100, rngs=rngs), rngs)
  return DEQ(cell, solver, adjoint, **kwargs, **options.deq_kwargs(rngs))


def make_model(layer: str, rngs: nnx.Rngs,
               options: Optional[layers.DeqOptions] = None) -> nnx.Sequential:
  """784 -> 100 linear, the equilibrium layer (width 100), 100 -> 10 linear."""
  if layer not in LAYERS:
    raise ValueError(f"unknown --layer {layer!r}; choose one of"
                     f" {', '.join(LAYERS)}")
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
