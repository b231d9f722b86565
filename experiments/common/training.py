"""The training loop both experiments share: jitted NNX + optax steps.

Data lives on the devices for the whole run (uint8), each epoch is shuffled
from the seed and batched by a jitted gather, so no batch crosses the host.
Batches are sharded over a 1-D mesh of every visible device and parameters are
replicated: `jit` inserts the gradient all-reduce. Checkpoints (orbax) are
written after every epoch, and a restarted run resumes from the last one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxdeq
from experiments.common import data as data_lib
from jaxdeq.nnx import DEQ, BackwardProbe

METRIC_KEYS = ("epoch", "train_error", "train_loss", "test_error", "test_loss",
               "forward_steps", "backward_steps", "skipped_steps",
               "train_seconds", "test_seconds", "examples_per_second")


@dataclasses.dataclass(frozen=True)
class Config:
  """Command-line settings shared by the experiments."""

  dataset: str
  data_dir: Optional[str] = None
  epochs: int = 10
  batch_size: int = 100
  seed: int = 0
  metrics_out: Optional[str] = None
  workdir: Optional[str] = None
  plots: Optional[str] = None
  limit_train: Optional[int] = None
  limit_test: Optional[int] = None
  distributed: bool = False
  progress: bool = True
  skip_grad_norm: Optional[float] = None

  def validate(self) -> None:
    if self.skip_grad_norm is not None and not self.skip_grad_norm > 0:
      raise ValueError(f"--skip-grad-norm must be > 0, got"
                       f" {self.skip_grad_norm}")
    if self.epochs < 1:
      raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
    if self.batch_size < 1:
      raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


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
  """

  name: str
  make_model: Callable[[nnx.Rngs], nnx.Module]
  make_optimizer: Callable[[int, int], optax.GradientTransformation]
  preprocess: Callable[[jax.Array], jax.Array]
  deq: Callable[[nnx.Module], DEQ]
  deq_input: Callable[[nnx.Module, jax.Array], jax.Array]


def _tree_all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves))


def epoch_order(seed: int, epoch: int, size: int) -> jax.Array:
  """The training permutation of `epoch` (1-based) for a run with `seed`."""
  return jax.random.permutation(
      jax.random.fold_in(jax.random.key(seed), epoch), size)


def make_steps(experiment: Experiment,
               skip_grad_norm: Optional[float] = None):
  """The jitted train and eval steps of an experiment.

  A train step whose parameter gradients are non-finite (the tutorial's NaN
  guard) or, with `skip_grad_norm`, whose global gradient norm exceeds it, is
  undone and counted in "skipped".
  """

  def loss_and_metrics(model, images, labels, mask=None):
    logits = model(experiment.preprocess(images))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    wrong = jnp.argmax(logits, -1) != labels
    if mask is not None:
      losses, wrong = losses * mask.astype(losses.dtype), wrong & mask
    errors = jnp.sum(wrong)
    stats = experiment.deq(model).stats.get_value()
    return jnp.mean(losses), (jnp.sum(losses), errors, stats.num_steps)

  wrt = nnx.DiffState(0, nnx.Any(nnx.Param, BackwardProbe))

  @nnx.jit
  def train_step(model, optimizer, images, labels):
    # nnx.state holds references; snapshot the values the update replaces.
    before = jax.tree.map(jnp.copy, nnx.state((model, optimizer)))
    grad_fn = nnx.value_and_grad(loss_and_metrics, argnums=wrt, has_aux=True)
    (_, (loss_sum, errors, forward_steps)), grads = grad_fn(
        model, images, labels)
    param_grads, probe_grads = nnx.split_state(grads, nnx.Param, BackwardProbe)
    backward = jaxdeq.BackwardStats.from_probe_grad(
        jax.tree.leaves(probe_grads)[0])
    keep = _tree_all_finite(param_grads)
    if skip_grad_norm is not None:
      keep &= optax.global_norm(param_grads) <= skip_grad_norm
    # optax's own updates (Adam's bias correction: float ** int32 count)
    # promote implicitly; everything else here runs under strict promotion.
    with jax.numpy_dtype_promotion("standard"):
      optimizer.update(model, param_grads)
    # The tutorial's NaN guard: a step with non-finite gradients is undone.
    after = nnx.state((model, optimizer))
    nnx.update((model, optimizer), jax.tree.map(
        lambda new, old: jnp.where(keep, new, old), after, before))
    return {
        "loss_sum": loss_sum, "errors": errors,
        "forward_steps": forward_steps.astype(jnp.float32),
        "backward_steps": backward.num_steps.astype(jnp.float32),
        "skipped": (~keep).astype(jnp.int32),
    }

  @nnx.jit
  def eval_step(model, images, labels, mask):
    _, (loss_sum, errors, forward_steps) = loss_and_metrics(
        model, images, labels, mask)
    return {"loss_sum": loss_sum, "errors": errors,
            "forward_steps": forward_steps.astype(jnp.float32)}

  return train_step, eval_step


def _sum_metrics(step_metrics: list[dict]) -> dict:
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *step_metrics)
  return {k: np.asarray(v) for k, v in stacked.items()}


class _Checkpoints:
  """Orbax checkpoints of (model, optimizer, history) after each epoch."""

  def __init__(self, workdir: Optional[str]):
    self.manager = None
    if workdir:
      import orbax.checkpoint as ocp

      self._ocp = ocp
      path = Path(workdir).absolute() / "checkpoints"
      self.manager = ocp.CheckpointManager(
          path, options=ocp.CheckpointManagerOptions(max_to_keep=2,
                                                     create=True))

  def restore(self, model, optimizer) -> tuple[int, list[dict]]:
    """Loads the latest checkpoint into the objects; returns (epoch, history)."""
    if self.manager is None or self.manager.latest_step() is None:
      return 0, []
    step = self.manager.latest_step()
    state = nnx.state((model, optimizer))
    restored = self.manager.restore(
        step, args=self._ocp.args.Composite(
            state=self._ocp.args.StandardRestore(nnx.to_pure_dict(state)),
            history=self._ocp.args.JsonRestore()))
    nnx.replace_by_pure_dict(state, restored["state"])
    nnx.update((model, optimizer), state)
    return step, list(restored["history"])

  def save(self, epoch: int, model, optimizer, history: list[dict]) -> None:
    if self.manager is None:
      return
    state = nnx.to_pure_dict(nnx.state((model, optimizer)))
    self.manager.save(epoch, args=self._ocp.args.Composite(
        state=self._ocp.args.StandardSave(state),
        history=self._ocp.args.JsonSave(history)))
    self.manager.wait_until_finished()


def _progress(total: int, enabled: bool, desc: str):
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, leave=False,
              disable=not (enabled and sys.stderr.isatty()),
              dynamic_ncols=True, file=sys.stderr)


def train_and_evaluate(config: Config, experiment: Experiment) -> list[dict]:
  """Trains, evaluates every epoch, writes metrics, checkpoints and plots.

  Returns:
    One dict of metrics per epoch (the keys of `METRIC_KEYS`).
  """
  config.validate()
  if config.distributed:
    jax.distributed.initialize()
  dataset = data_lib.load(config.dataset, config.data_dir).limit(
      config.limit_train, config.limit_test)
  devices = jax.devices()
  if config.batch_size % len(devices):
    raise ValueError(f"--batch-size {config.batch_size} must be a multiple of"
                     f" the {len(devices)} devices")
  steps_per_epoch = len(dataset.train_images) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(dataset.train_images)} training examples are"
                     f" fewer than one batch of {config.batch_size}")
  mesh = Mesh(np.asarray(devices), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

  train_images = jax.device_put(dataset.train_images, replicated)
  train_labels = jax.device_put(dataset.train_labels, replicated)
  test_images = jax.device_put(dataset.test_images, replicated)
  test_labels = jax.device_put(dataset.test_labels, replicated)

  @jax.jit
  def gather(images, labels, order, index):
    rows = jax.lax.dynamic_slice_in_dim(order, index * config.batch_size,
                                        config.batch_size)
    batch = images[rows], labels[rows]
    return jax.lax.with_sharding_constraint(batch, batch_sharding)

  model = experiment.make_model(nnx.Rngs(config.seed))
  optimizer = nnx.Optimizer(
      model, experiment.make_optimizer(steps_per_epoch, config.epochs),
      wrt=nnx.Param)
  state = nnx.state((model, optimizer))
  nnx.update((model, optimizer), jax.device_put(state, replicated))
  train_step, eval_step = make_steps(experiment, config.skip_grad_norm)

  checkpoints = _Checkpoints(config.workdir)
  start_epoch, history = checkpoints.restore(model, optimizer)
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model,
                                                             nnx.Param)))
  print(f"{experiment.name}: {dataset.source}; {len(dataset.train_images)}"
        f" train / {len(dataset.test_images)} test examples;"
        f" {num_params:,} parameters; {len(devices)} device(s)"
        f" ({devices[0].platform})"
        + (f"; resuming after epoch {start_epoch}" if start_epoch else ""),
        flush=True)
  _print_header()
  if config.metrics_out:
    _write_metrics(config.metrics_out, history)
  for row in history:
    _print_row(row)

  test_batches = -(-len(dataset.test_images) // config.batch_size)
  test_order = jnp.arange(test_batches * config.batch_size) % len(
      dataset.test_images)
  # The last test batch is padded with repeats that the mask leaves out.
  test_mask = jax.device_put(
      (np.arange(test_batches * config.batch_size) < len(dataset.test_images)
       ).reshape(test_batches, config.batch_size),
      NamedSharding(mesh, PartitionSpec(None, "data")))
  for epoch in range(start_epoch + 1, config.epochs + 1):
    order = epoch_order(config.seed, epoch, len(dataset.train_images))
    model.train()
    bar = _progress(steps_per_epoch, config.progress, f"epoch {epoch}")
    started = time.perf_counter()
    step_metrics = []
    for index in range(steps_per_epoch):
      images, labels = gather(train_images, train_labels, order, index)
      step_metrics.append(train_step(model, optimizer, images, labels))
      if bar.disable is False and (index % 50 == 49
                                   or index == steps_per_epoch - 1):
        bar.set_postfix(loss=f"{float(step_metrics[-1]['loss_sum']) / config.batch_size:.4f}")  # noqa: E501
        bar.update(index + 1 - bar.n)
    train = _sum_metrics(step_metrics)  # blocks on the epoch's results
    train_seconds = time.perf_counter() - started
    bar.close()

    model.eval()
    started = time.perf_counter()
    eval_metrics = [
        eval_step(model, *gather(test_images, test_labels, test_order, i),
                  test_mask[i]) for i in range(test_batches)
    ]
    test = _sum_metrics(eval_metrics)
    test_seconds = time.perf_counter() - started
    n_test = len(dataset.test_images)
    n_train = steps_per_epoch * config.batch_size
    row = {
        "epoch": epoch,
        "train_error": float(train["errors"].sum() / n_train),
        "train_loss": float(train["loss_sum"].sum() / n_train),
        "test_error": float(test["errors"].sum() / n_test),
        "test_loss": float(test["loss_sum"].sum() / n_test),
        "forward_steps": float(train["forward_steps"].mean()),
        "test_forward_steps": float(test["forward_steps"].mean()),
        "backward_steps": float(train["backward_steps"].mean()),
        "skipped_steps": int(train["skipped"].sum()),
        "train_seconds": round(train_seconds, 3),
        "test_seconds": round(test_seconds, 3),
        "examples_per_second": round(n_train / train_seconds, 1),
    }
    history.append(row)
    _print_row(row)
    checkpoints.save(epoch, model, optimizer, history)
    if config.metrics_out:
      _write_metrics(config.metrics_out, history)
  if config.plots:
    from experiments.common import plots

    plots.write_all(config.plots, experiment, model, history,
                    experiment.preprocess(test_images[:config.batch_size]))
    print(f"plots written to {config.plots}", flush=True)
  return history


_COLUMNS = (("epoch", "{:>5d}"), ("train_error", "{:>11.4f}"),
            ("train_loss", "{:>10.4f}"), ("test_error", "{:>10.4f}"),
            ("test_loss", "{:>9.4f}"), ("forward_steps", "{:>13.2f}"),
            ("test_forward_steps", "{:>18.2f}"),
            ("backward_steps", "{:>14.2f}"), ("skipped_steps", "{:>13d}"),
            ("train_seconds", "{:>13.2f}"), ("test_seconds", "{:>12.2f}"))


def _print_header() -> None:
  print(" ".join(f"{name:>{len(fmt.format(0))}}" if "d" in fmt else
                 f"{name:>{len(fmt.format(0.0))}}" for name, fmt in _COLUMNS),
        flush=True)


def _print_row(row: dict) -> None:
  print(" ".join(fmt.format(row[name]) for name, fmt in _COLUMNS), flush=True)


def _write_metrics(path: str, history: list[dict]) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  temporary = path + ".tmp"
  with open(temporary, "w") as handle:
    for row in history:
      handle.write(json.dumps(row) + "\n")
  os.replace(temporary, path)
