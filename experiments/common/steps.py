"""The jitted train, eval and diagnostics steps, and what they need: the
`Experiment` (what differs between experiments), the NaN guard, metrics."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxdeq
from experiments.common import layers
from jaxdeq.nnx import DEQ, BackwardProbe


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What differs between experiments.

  Attributes:
    name: printed in the header.
    make_model: rngs -> NNX model whose call maps float images to logits.
    make_optimizer: (steps_per_epoch, epochs) -> optax transformation.
    preprocess: uint8 images (B, H, W, C) -> model input, inside jit.
    deq: model -> its DEQ layer (for stats and plots).
    deq_input: (model, model input) -> the DEQ layer's input x (plots).
    forward: (model, model input, warm) -> (logits, logits of the
      fixed-point-correction states, z*); `warm` is None or (stored z* rows,
      seen mask) for warm starts.
  """

  name: str
  make_model: Callable[[nnx.Rngs, layers.DeqOptions], nnx.Module]
  make_optimizer: Callable[[int, int], optax.GradientTransformation]
  preprocess: Callable[[jax.Array], jax.Array]
  deq: Callable[[nnx.Module], DEQ]
  deq_input: Callable[[nnx.Module, jax.Array], jax.Array]
  forward: Callable[..., tuple]


def _should_skip(grads, *unused, skip_grad_norm: Optional[float] = None):
  """optax's `should_skip_update_fn`: gradients that are not finite (the
  tutorial's NaN guard) or, with `skip_grad_norm`, whose global norm exceeds
  it. Returns (skip, info)."""
  del unused
  skip = ~_tree_all_finite(grads)
  if skip_grad_norm is not None:
    skip |= ~(optax.tree.norm(grads) <= skip_grad_norm)
  return skip, {"should_skip": skip}


def guarded(optimizer: optax.GradientTransformation,
            skip_grad_norm: Optional[float] = None
            ) -> optax.GradientTransformation:
  """`optimizer` that skips (zero update, state kept) the steps
  `_should_skip` refuses: optax's `MultiSteps` with one step per update."""
  return optax.MultiSteps(
      optimizer, every_k_schedule=1,
      should_skip_update_fn=functools.partial(
          _should_skip, skip_grad_norm=skip_grad_norm))


def _tree_all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves))


def epoch_order(seed: int, epoch, size: int) -> jax.Array:
  """The training permutation of `epoch` (1-based) for a run with `seed`."""
  return jax.random.permutation(
      jax.random.fold_in(jax.random.key(seed), epoch), size)


def train_metrics() -> nnx.MultiMetric:
  """The train step's running metrics: per-example loss and error, per-step
  solver steps, skipped updates and Jacobian penalty."""
  return nnx.MultiMetric(**{name: nnx.metrics.Average(name) for name in (
      "loss", "error", "forward_steps", "backward_steps", "skipped",
      "penalty")})


def eval_metrics() -> nnx.MultiMetric:
  """The eval step's running metrics (padding examples masked out)."""
  return nnx.MultiMetric(**{name: nnx.metrics.Average(name) for name in (
      "loss", "error", "forward_steps")})


def make_loss(experiment: Experiment, penalty_weight: float = 0.0,
              fp_weights: tuple[float, ...] = (1.0,)):
  """(model, images, labels, mask=None, warm=None) -> (loss, aux).

  The loss is the cross-entropy at z* (over the examples `mask` keeps),
  plus `fp_weights[i]` times the cross-entropy at correction state i (one
  weight: the same for all), plus `penalty_weight` times the DEQ's Jacobian
  penalty. aux: (per-example losses, per-example errors, forward steps,
  penalty, z*).
  """

  def loss_and_metrics(model, images, labels, mask=None, warm=None):
    logits, extra, z_star = experiment.forward(
        model, experiment.preprocess(images), warm)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    wrong = (jnp.argmax(logits, -1) != labels).astype(losses.dtype)
    if mask is None:
      loss = jnp.mean(losses)
    else:
      loss = jnp.sum(losses * mask.astype(losses.dtype)) / jnp.maximum(
          jnp.sum(mask), 1).astype(losses.dtype)
    for i, state_logits in enumerate(extra):
      weight = fp_weights[i] if len(fp_weights) > 1 else fp_weights[0]
      loss = loss + jnp.asarray(weight, loss.dtype) * jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(state_logits,
                                                          labels))
    layer = experiment.deq(model)
    penalty = layer.penalty[...]
    if penalty_weight:
      loss = loss + jnp.asarray(penalty_weight, loss.dtype) * penalty
    stats = layer.stats.get_value()
    return loss, (losses, wrong, stats.num_steps, penalty, z_star)

  return loss_and_metrics


def make_steps(experiment: Experiment,
               skip_grad_norm: Optional[float] = None,
               penalty_weight: float = 0.0,
               fp_weights: tuple[float, ...] = (1.0,),
               warm_start: bool = False):
  """The jitted train and eval steps of an experiment.

  Both steps update the `train_metrics()` / `eval_metrics()` they are given
  in place; the loss is `make_loss`'s. A train step whose parameter
  gradients are non-finite (the tutorial's NaN guard) or, with
  `skip_grad_norm`, whose global gradient norm exceeds it, is counted in
  "skipped" and leaves the model as it was: the optimiser must be
  `guarded(..., skip_grad_norm)`, which skips the update, and the step
  restores the model's non-parameter state. With `warm_start`, the train
  step takes and returns the store of each training example's last z* (and
  a seen mask) and starts its solve there.
  """
  loss_and_metrics = make_loss(experiment, penalty_weight, fp_weights)
  wrt = nnx.DiffState(0, nnx.Any(nnx.Param, BackwardProbe))
  should_skip = functools.partial(_should_skip, skip_grad_norm=skip_grad_norm)

  # The warm-start store (one z* per training example) is donated: updated
  # in place rather than copied whole at every step.
  @functools.partial(nnx.jit, donate_argnums=(5,))
  def train_step(model, optimizer, metrics, images, labels, store=None,
                 rows=None):
    # The forward pass may move the model's non-parameter state (DEQ stats,
    # BatchNorm statistics, spectral-norm vectors, RNG counts); a skipped
    # step puts back this small part. Parameters and optimiser state are
    # left alone by the guarded optimiser itself (no copy of them).
    state_before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Not(nnx.Param)))
    warm = None
    if warm_start:
      warm = (jax.tree.map(lambda s: s[rows], store[0]), store[1][rows])
    grad_fn = nnx.value_and_grad(loss_and_metrics, argnums=wrt, has_aux=True)
    (_, (losses, wrong, forward_steps, penalty, z_star)), grads = grad_fn(
        model, images, labels, None, warm)
    param_grads, probe_grads = nnx.split_state(grads, nnx.Param, BackwardProbe)
    backward = jaxdeq.BackwardStats.from_probe_grad(
        jax.tree.leaves(probe_grads)[0])
    skip, _ = should_skip(param_grads)
    # optax's own updates (Adam's bias correction: float ** int32 count)
    # promote implicitly; everything else here runs under strict promotion.
    with jax.numpy_dtype_promotion("standard"):
      optimizer.update(model, param_grads)
    state_after = nnx.state(model, nnx.Not(nnx.Param))
    nnx.update(model, jax.tree.map(lambda new, old: jnp.where(skip, old, new),
                                   state_after, state_before))
    keep = ~skip
    if warm_start:
      z_star = jax.lax.stop_gradient(z_star)
      store = (jax.tree.map(lambda s, z: s.at[rows].set(z.astype(s.dtype)),
                            store[0], z_star),
               store[1].at[rows].set(True))
    metrics.update(loss=losses, error=wrong,
                   forward_steps=forward_steps.astype(jnp.float32),
                   backward_steps=backward.num_steps.astype(jnp.float32),
                   skipped=(~keep).astype(jnp.float32),
                   penalty=penalty.astype(jnp.float32))
    return store

  @nnx.jit
  def eval_step(model, metrics, images, labels, mask):
    _, (losses, wrong, forward_steps, _, _) = loss_and_metrics(
        model, images, labels, mask)
    metrics.update(loss=losses, error=wrong,
                   forward_steps=forward_steps.astype(jnp.float32),
                   mask={"loss": mask, "error": mask})

  return train_step, eval_step


def make_diagnostics(experiment: Experiment, num_probes: int = 4,
                     num_iters: int = 20):
  """A jitted (model, images, key) -> (penalty, mean rho, max rho) at z*.

  The penalty is the Hutchinson estimate of ||df/dz||_F^2 / d; rho the
  power-iteration estimate of the spectral radius of df/dz, both at the
  fixed point of each example (evaluation mode).
  """

  @nnx.jit
  def diagnostics(model, images, key):
    layer = experiment.deq(model)
    x = experiment.deq_input(model, experiment.preprocess(images))
    z = layer.solve(x).value
    penalty_key, rho_key = jax.random.split(key)
    penalty = layer.penalty_at(x, penalty_key, z=z, num_probes=num_probes)
    rho = layer.spectral_radius(x, rho_key, num_iters=num_iters, z=z)
    return penalty, jnp.mean(rho), jnp.max(rho)

  return diagnostics


def compute(metrics: nnx.MultiMetric) -> dict[str, float]:
  # nnx's Average divides its float32 total by an int32 count.
  with jax.numpy_dtype_promotion("standard"):
    return {k: float(v) for k, v in metrics.compute().items()}
