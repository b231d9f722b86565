"""The tutorial's MNIST models, one per layer kind."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import jaxdeq
from experiments.common import layers
from jaxdeq.nnx import DEQ, TanhCell

# layer -> (its DEQ, default epochs), as in the tutorial.
LAYERS = {
    "fixed_point": (lambda rngs: DEQ(TanhCell(100, rngs=rngs), jaxdeq.FixedPointIteration(tol=1e-4, max_steps=200), jaxdeq.UnrolledAdjoint()), 10),  # noqa: E501
    "newton": (lambda rngs: DEQ(TanhCell(100, rngs=rngs), jaxdeq.Newton(tol=1e-4, max_steps=40), jaxdeq.UnrolledAdjoint(), z_init=jnp.tanh, unconverged="zero"), 8),  # noqa: E501
    "newton_implicit": (lambda rngs: DEQ(TanhCell(100, rngs=rngs), jaxdeq.Newton(tol=1e-4, max_steps=40), jaxdeq.ImplicitAdjoint(), z_init=jnp.tanh), 10),  # noqa: E501
    # The same two layers with a matrix-free GMRES inner solve instead of LU.
    "newton_gmres": (lambda rngs: DEQ(TanhCell(100, rngs=rngs), jaxdeq.Newton(tol=1e-4, max_steps=40, linear_solver="gmres"), jaxdeq.UnrolledAdjoint(), z_init=jnp.tanh, unconverged="zero"), 8),  # noqa: E501
    "newton_implicit_gmres": (lambda rngs: DEQ(TanhCell(100, rngs=rngs), jaxdeq.Newton(tol=1e-4, max_steps=40, linear_solver="gmres"), jaxdeq.ImplicitAdjoint(), z_init=jnp.tanh), 10),  # noqa: E501
    "deq": (lambda rngs: DEQ(TanhCell(100, rngs=rngs), jaxdeq.Anderson(tol=1e-4, max_steps=50, m=5, lam_relative=True), jaxdeq.ImplicitAdjoint()), 10),  # noqa: E501
}


# Backprop through a long Newton trajectory can explode (see README): these
# layers' runs undo updates with gradient norm above this unless
# --skip-grad-norm says otherwise.
UNROLLED_NEWTON_SKIP_GRAD_NORM = {"newton": 100.0, "newton_gmres": 100.0}


def make_model(layer: str, rngs: nnx.Rngs) -> nnx.Sequential:
  """784 -> 100 linear, the equilibrium layer (width 100), 100 -> 10 linear."""
  if layer not in LAYERS:
    raise ValueError(f"unknown --layer {layer!r}; choose one of"
                     f" {', '.join(LAYERS)}")
  return nnx.Sequential(layers.linear(784, 100, rngs), LAYERS[layer][0](rngs),
                        layers.linear(100, 10, rngs))
