"""PNG figures: residual traces on a batch and curves over epochs."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

import jaxdeq


def residual_traces(experiment, model, inputs):
  """Forward and implicit-backward residual traces of the DEQ on a batch.

  Returns:
    (forward, backward, backward_steps): arrays (steps, batch) and the
    backward solve's step count; backward is None when the layer's adjoint
    is not implicit (there is no backward solve to trace). A GMRES backward
    records one row, its residual after all `backward_steps` iterations.
  """
  layer = experiment.deq(model)
  x = experiment.deq_input(model, inputs)
  forward = layer.solve(x).stats
  steps = int(forward.num_steps)
  forward_trace = np.asarray(forward.trace[:steps])
  if not isinstance(layer.adjoint, jaxdeq.ImplicitAdjoint):
    return forward_trace, None, 0
  captured = []
  cell_map, cell_state = layer.cell_map()
  adjoint = jaxdeq.ImplicitAdjoint(linear_solver=layer.adjoint.linear_solver,
                                   callback=captured.append)
  z0 = layer.initial_state(x)

  # Everything as arguments: closed-over arrays would be constant-folded.
  def pulled(x, cell_state, z0):
    z = jaxdeq.fixed_point(cell_map, z0, (cell_state, x),
                           solver=layer.eval_solver, adjoint=adjoint).value
    keys = jax.random.split(jax.random.key(0), len(jax.tree.leaves(z)))
    cotangents = [jax.random.normal(k, v.shape, v.dtype)
                  for k, v in zip(keys, jax.tree.leaves(z))]
    return sum(jnp.vdot(v, c) for v, c in zip(jax.tree.leaves(z),
                                                cotangents))

  jax.block_until_ready(jax.jit(jax.grad(pulled))(x, cell_state, z0))
  jax.effects_barrier()
  if not captured:  # the callback ran in another process (multi-process)
    return forward_trace, None, 0
  stats = captured[-1]
  steps = int(stats.num_steps)
  return forward_trace, np.asarray(stats.trace[:steps]), steps


def write_all(directory, experiment, model, history, inputs) -> list[str]:
  """Writes residuals.png and curves.png into `directory`; returns the paths.

  With `directory` None, only the traces are computed (the other processes
  of a multi-process run: their devices take part in the solves).
  """
  model.eval()
  forward, backward, backward_steps = residual_traces(experiment, model,
                                                      inputs)
  if directory is None:
    return []
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(directory, exist_ok=True)
  figures = [("residuals.png", _residual_figure(
      plt, experiment, model, forward, backward, backward_steps))]
  if history:
    figures.append(("curves.png", _curves_figure(plt, experiment, history)))
  paths = []
  for name, fig in figures:
    paths.append(os.path.join(directory, name))
    fig.savefig(paths[-1])
    plt.close(fig)
  return paths


def _integer_ticks(axis) -> None:
  import matplotlib.ticker

  axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def _residual_figure(plt, experiment, model, forward, backward,
                     backward_steps):
  """Worst and median residual per solver step, forward and backward."""
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for trace, label, color, count in (
      (forward, "forward", "C0", None),
      (backward, "backward", "C1", backward_steps)):
    if trace is None or trace.size == 0:
      continue
    if count is not None and len(trace) < count:
      # GMRES keeps no per-iteration residuals: one point, at its count.
      ax.semilogy([count], [np.nanmax(trace[-1])], "s", color=color,
                  label=f"{label} (worst sample; GMRES: residual after"
                  f" {count} iterations)")
      continue
    steps = np.arange(1, len(trace) + 1)
    ax.semilogy(steps, np.nanmax(trace, axis=1), ".-", color=color,
                label=f"{label} (worst sample)")
    ax.semilogy(steps, np.nanmedian(trace, axis=1), ".--", color=color,
                label=f"{label} (median)")
  _integer_ticks(ax)
  tol = experiment.deq(model).solver.tol
  ax.axhline(tol, color="gray", lw=0.8, ls=":", label=f"tol {tol:g}")
  ax.set_xlabel("solver step")
  ax.set_ylabel("relative residual")
  ax.set_title(f"{experiment.name}: residuals on one test batch")
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def _curves_figure(plt, experiment, history):
  """Errors, solver steps and the stability diagnostics over epochs."""
  epochs = [row["epoch"] for row in history]
  column = lambda key: [row.get(key, np.nan) for row in history]
  fig, (left, right, stability) = plt.subplots(1, 3, figsize=(15, 4),
                                               dpi=120)
  left.plot(epochs, column("train_error"), "o-", label="train")
  left.plot(epochs, column("test_error"), "o-", label="test")
  left.set_ylabel("error")
  right.plot(epochs, column("forward_steps"), "o-", label="forward (train)")
  right.plot(epochs, column("backward_steps"), "o-", label="backward (train)")
  right.set_ylabel("solver steps per batch")
  stability.plot(epochs, column("spectral_radius"), "o-",
                 label="spectral radius (mean)")
  stability.plot(epochs, column("spectral_radius_max"), "o--",
                 label="spectral radius (max)")
  stability.plot(epochs, column("jacobian_penalty"), "s-",
                 label="||df/dz||_F^2 / d")
  stability.axhline(1.0, color="gray", lw=0.8, ls=":")
  stability.set_title("at z* on one test batch", fontsize=9)
  for axis in (left, right, stability):
    axis.set_xlabel("epoch")
    axis.legend(fontsize=8)
    _integer_ticks(axis)
  fig.suptitle(experiment.name)
  fig.tight_layout()
  return fig
