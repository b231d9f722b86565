"""Training stabilisers for cells: variational dropout, weight normalisation.

Both must respect the fixed point: a dropout mask that changed between
iterations, or weights renormalised differently at each step, would give the
solver a different map at every step. So the mask is drawn once per forward
solve and the normalised weights are computed once per solve, before it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class DropoutKey(nnx.Variable):
  """Raw key data (uint32) of the mask a `VariationalDropout` applies."""


class VariationalDropout(nnx.Module):
  """Dropout whose mask stays the same for a whole fixed-point solve.

  A fresh mask at every solver iteration changes the map at every step,
  so there is no fixed point to find. `DEQ` calls `new_mask()` once before
  each training solve; every iteration then regenerates the same mask from
  that one key (the mask's shape is only known inside the cell). Scaled by
  1 / (1 - rate) as `nnx.Dropout` is; the identity when `deterministic`
  (set by `model.eval()`) or `rate == 0`.

  Args:
    rate: probability of dropping an entry, in [0, 1).
    broadcast_dims: axes along which one mask entry is shared (e.g. (1, 2)
      for one mask per channel of an NHWC map, as in torchdeq's 2-D
      variational dropout).
    rngs: `nnx.Rngs` with a "dropout" stream (or a default one).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxdeq.nnx import VariationalDropout
    >>> drop = VariationalDropout(0.5, rngs=nnx.Rngs(0))
    >>> drop.new_mask()
    >>> x = jnp.ones((2, 4))
    >>> bool(jnp.all(drop(x) == drop(x)))  # the same mask at every call
    True
  """

  def __init__(self, rate: float, *, broadcast_dims: tuple[int, ...] = (),
               rngs: nnx.Rngs):
    if not 0 <= rate < 1:
      raise ValueError(f"VariationalDropout: rate must be in [0, 1), got"
                       f" {rate!r}")
    self.rate = rate
    self.broadcast_dims = tuple(broadcast_dims)
    self.deterministic = False
    self.rngs = rngs.fork() if hasattr(rngs, "fork") else rngs
    self.key = DropoutKey(jax.random.key_data(jax.random.key(0)))

  def new_mask(self) -> None:
    """Draws the key of the next solve's mask (called by `DEQ`)."""
    stream = self.rngs["dropout"] if "dropout" in self.rngs else (
        self.rngs.default)
    self.key.set_value(jax.random.key_data(stream()))

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0:
      return x
    shape = tuple(1 if axis in self.broadcast_dims else size
                  for axis, size in enumerate(x.shape))
    keep = jax.random.bernoulli(jax.random.wrap_key_data(self.key[...]),
                                1.0 - self.rate, shape)
    scale = jnp.asarray(1.0 / (1.0 - self.rate), x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


def draw_dropout_masks(cell: nnx.Module) -> None:
  """New mask keys for every active `VariationalDropout` inside `cell`."""
  for _, module in nnx.iter_graph(cell):
    if isinstance(module, VariationalDropout) and not (
        module.deterministic or module.rate == 0):
      module.new_mask()


class WeightScale(nnx.Param):
  """The per-output-feature length g of a weight-normalised kernel."""


class SpectralVector(nnx.Variable):
  """The power-iteration vector of a spectrally normalised kernel."""


def is_kernel(path: tuple, value: Any) -> bool:
  """The weights normalisation applies to: `Param`s with 2 or more axes
  (convolution and dense kernels; not GroupNorm scales or biases)."""
  del path
  return isinstance(value, nnx.Param) and jnp.ndim(value[...]) >= 2


class CellNormalization(nnx.Module):
  """Weight or spectral normalisation of a cell's kernels, hoisted.

  `apply(cell_state)` returns the cell's state with every kernel (a `Param`
  with >= 2 axes, output features last) replaced by its normalised value;
  `DEQ` calls it once per solve and hands the result to the solver, so the
  normalisation is a function of the parameters outside the loop, not work
  repeated at every iteration. (flax's `nnx.WeightNorm` / `nnx.SpectralNorm`
  wrap a layer and renormalise, writing the result into the layer, at
  every call: inside a solver loop that is once per iteration, and the
  spectral one's power-iteration update is a state change the loop cannot
  make.)

  - "weight" (Salimans & Kingma, 2016): w = g * v / ||v||, the norm over
    all axes but the last, g a `WeightScale` parameter initialised to
    ||v|| (the initial weights are unchanged).
  - "spectral" (Miyato et al., 2018): w = v / sigma(v), sigma from one
    power-iteration step per training solve on v reshaped to
    (fan_in, features), its vector kept in a `SpectralVector`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxdeq.nnx import CellNormalization, TanhCell
    >>> cell = TanhCell(4, rngs=nnx.Rngs(0))
    >>> norm = CellNormalization(cell, "spectral", rngs=nnx.Rngs(1))
    >>> for _ in range(30):  # one power-iteration step per training solve
    ...   state = norm.apply(nnx.state(cell), update=True)
    >>> w = state["kernel"][...]
    >>> round(float(jnp.linalg.norm(w, 2)), 2)
    1.0
  """

  def __init__(self, cell: nnx.Module, kind: str, *, rngs: nnx.Rngs,
               epsilon: float = 1e-12):
    if kind not in ("weight", "spectral"):
      raise ValueError(f"normalization must be None, 'weight' or 'spectral',"
                       f" got {kind!r}")
    self.kind = kind
    self.epsilon = epsilon
    kernels = {path: value[...] for path, value in
               nnx.to_flat_state(nnx.state(cell, is_kernel))}
    if not kernels:
      raise ValueError(f"{kind} normalization: the cell has no kernels"
                       " (Params with >= 2 axes)")
    self.paths = tuple(kernels)
    if kind == "weight":
      self.scales = nnx.data({
          _name(p): WeightScale(_column_norms(v, epsilon))
          for p, v in kernels.items()})
    else:
      key = rngs.params()
      self.vectors = nnx.data({
          _name(p): SpectralVector(_unit(jax.random.normal(
              jax.random.fold_in(key, i), (v.shape[-1],), v.dtype)))
          for i, (p, v) in enumerate(kernels.items())})

  def apply(self, cell_state: nnx.State, *, update: bool) -> nnx.State:
    """The cell state with normalised kernels (`update`: advance the
    spectral power iteration, done once per training solve)."""
    flat = dict(nnx.to_flat_state(cell_state))
    for path in self.paths:
      variable = flat[path]
      kernel = variable[...]
      if self.kind == "weight":
        scale = self.scales[_name(path)][...].astype(kernel.dtype)
        factor = scale / _column_norms(kernel, self.epsilon)
        normalized = kernel * factor.reshape((1,) * (kernel.ndim - 1) + (-1,))
      else:
        normalized = self._spectral(path, kernel, update)
      flat[path] = variable.replace(normalized)
    return nnx.from_flat_state(flat)

  def _spectral(self, path, kernel, update):
    vector = self.vectors[_name(path)]
    matrix = kernel.reshape(-1, kernel.shape[-1])
    v = jax.lax.stop_gradient(vector[...]).astype(kernel.dtype)
    u = _unit(jax.lax.stop_gradient(matrix) @ v, self.epsilon)
    v = _unit(jax.lax.stop_gradient(matrix).T @ u, self.epsilon)
    if update:
      vector.set_value(v.astype(vector[...].dtype))
    sigma = u @ (matrix @ v)
    return kernel / jnp.maximum(sigma, jnp.asarray(self.epsilon, sigma.dtype))


def _name(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _column_norms(kernel: jax.Array, epsilon: float) -> jax.Array:
  axes = tuple(range(kernel.ndim - 1))
  return jnp.sqrt(jnp.sum(kernel * kernel, axis=axes)
                  + jnp.asarray(epsilon, kernel.dtype))


def _unit(v: jax.Array, epsilon: float = 1e-12) -> jax.Array:
  return v / (jnp.linalg.norm(v) + jnp.asarray(epsilon, v.dtype))
