"""The training loop both experiments share: jitted NNX + optax steps.

Data lives on the devices for the whole run (uint8), each epoch is shuffled
from the seed and batched by a jitted gather, so no batch crosses the host.
Batches are sharded over a 1-D mesh of every device of every process
(`--distributed` starts several) and parameters are replicated: `jit` inserts
the gradient all-reduce. Metrics accumulate on the devices in an
`nnx.MultiMetric` and reach the host once per epoch. Checkpoints (orbax) are
written after every epoch, and a restarted run resumes from the last one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxdeq
from experiments.common import data as data_lib
from experiments.common import layers
from jaxdeq.nnx import DEQ, BackwardProbe

METRIC_KEYS = ("epoch", "train_error", "train_loss", "test_error", "test_loss",
               "forward_steps", "backward_steps", "skipped_steps",
               "train_seconds", "test_seconds", "examples_per_second",
               "jacobian_penalty", "spectral_radius", "spectral_radius_max")

# Warm starts keep one z* per training example on the devices; past this
# many bytes the flag is refused rather than exhausting device memory.
WARM_START_MAX_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of a run: a config module's `get_config()` (e.g.
  `experiments/mnist/configs/default.py`) with command-line overrides.

  `model` names the experiment's `--layer` (MNIST) or `--model` (CIFAR-10).
  `coordinator_address`, `num_processes` and `process_id` go to
  `jax.distributed.initialize` with `distributed` (None: detected from the
  cluster's environment, e.g. SLURM).
  """

  dataset: str
  model: Optional[str] = None
  data_dir: Optional[str] = None
  epochs: Optional[int] = 10
  batch_size: int = 100
  seed: int = 0
  metrics_out: Optional[str] = None
  workdir: Optional[str] = None
  plots: Optional[str] = None
  limit_train: Optional[int] = None
  limit_test: Optional[int] = None
  distributed: bool = False
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  progress: bool = True
  skip_grad_norm: Optional[float] = None
  deq_options: layers.DeqOptions = layers.DeqOptions()
  fp_weight: Union[float, tuple[float, ...]] = 1.0
  warm_start: bool = False

  def validate(self) -> None:
    options = self.deq_options
    if not options.jacobian_penalty >= 0:
      raise ValueError(f"--jacobian-penalty must be >= 0, got"
                       f" {options.jacobian_penalty}")
    if not 0 <= options.dropout < 1:
      raise ValueError(f"--dropout must be in [0, 1), got {options.dropout}")
    weights = self.fp_weights()
    if not all(w > 0 for w in weights):
      raise ValueError(f"--fp-weight must be > 0, got {self.fp_weight}")
    steps = len(options.record_steps)
    if len(weights) not in (1, steps) and steps:
      raise ValueError(
          f"--fp-weight has {len(weights)} weights for {steps}"
          " --fp-correction steps: give one, or one per step")
    if self.skip_grad_norm is not None and not self.skip_grad_norm > 0:
      raise ValueError(f"--skip-grad-norm must be > 0, got"
                       f" {self.skip_grad_norm}")
    if self.epochs is None or self.epochs < 1:
      raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
    if self.batch_size < 1:
      raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
    cluster = {"--coordinator-address": self.coordinator_address,
               "--num-processes": self.num_processes,
               "--process-id": self.process_id}
    given = [flag for flag, value in cluster.items() if value is not None]
    if given and not self.distributed:
      raise ValueError(f"{', '.join(given)} only apply with --distributed")
    if self.num_processes is not None and self.num_processes < 1:
      raise ValueError(f"--num-processes must be >= 1, got"
                       f" {self.num_processes}")
    if self.process_id is not None and not (
        0 <= self.process_id < (self.num_processes or self.process_id + 1)):
      raise ValueError(f"--process-id must be in [0, --num-processes), got"
                       f" {self.process_id}")

  def fp_weights(self) -> tuple[float, ...]:
    """One loss weight per correction state (or one for all)."""
    if isinstance(self.fp_weight, (int, float)):
      return (float(self.fp_weight),)
    return tuple(float(w) for w in self.fp_weight)


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


def make_steps(experiment: Experiment,
               skip_grad_norm: Optional[float] = None,
               penalty_weight: float = 0.0,
               fp_weights: tuple[float, ...] = (1.0,),
               warm_start: bool = False):
  """The jitted train and eval steps of an experiment.

  Both steps update the `train_metrics()` / `eval_metrics()` they are given
  in place. The loss is the cross-entropy at z*, plus `fp_weights[i]` times the
  cross-entropy at correction state i (one weight: the same for all),
  plus `penalty_weight`
  times the DEQ's Jacobian penalty. A train step whose parameter gradients
  are non-finite (the tutorial's NaN guard) or, with `skip_grad_norm`, whose
  global gradient norm exceeds it, is counted in "skipped" and leaves the
  model as it was: the optimiser must be `guarded(..., skip_grad_norm)`,
  which skips the update, and the step restores the model's non-parameter
  state. With
  `warm_start`, the train step takes and returns the store of each training
  example's last z* (and a seen mask) and starts its solve there.
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


def _put(tree, sharding):
  """Values every process holds alike onto `sharding`, which may span the
  devices of several processes (`jax.device_put` cannot take a jax.Array
  there, and compares numpy values across processes, NaN != NaN)."""

  def put_array(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding,
                                        lambda index: x[index])

  def put(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put_array(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    return put_array(x)

  return jax.tree.map(put, tree)


def _compute(metrics: nnx.MultiMetric) -> dict[str, float]:
  # nnx's Average divides its float32 total by an int32 count.
  with jax.numpy_dtype_promotion("standard"):
    return {k: float(v) for k, v in metrics.compute().items()}


def _log(*args) -> None:
  """print, from the first process only."""
  if jax.process_index() == 0:
    print(*args, flush=True)


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

  def restore(self, model, optimizer, store=None):
    """Loads the latest checkpoint into the objects.

    Returns:
      (epoch, history, store): the warm-start store is restored when one is
      passed and the checkpoint holds one (else it comes back unchanged).
    """
    if self.manager is None or self.manager.latest_step() is None:
      return 0, [], store
    step = self.manager.latest_step()
    state = nnx.state((model, optimizer))
    items = dict(
        state=self._ocp.args.StandardRestore(nnx.to_pure_dict(state)),
        history=self._ocp.args.JsonRestore())
    saved_items = set(self.manager.item_metadata(step).keys())
    if store is not None and "warm_start" in saved_items:
      items["warm_start"] = self._ocp.args.StandardRestore(
          {"z": store[0], "seen": store[1]})
    restored = self.manager.restore(step,
                                    args=self._ocp.args.Composite(**items))
    nnx.replace_by_pure_dict(state, restored["state"])
    nnx.update((model, optimizer), state)
    if "warm_start" in items:
      warm = restored["warm_start"]
      store = _put((warm["z"], warm["seen"]),
                   jax.tree.leaves(store)[0].sharding)
    return step, list(restored["history"]), store

  def save(self, epoch: int, model, optimizer, history: list[dict],
           store=None) -> None:
    if self.manager is None:
      return
    state = nnx.to_pure_dict(nnx.state((model, optimizer)))
    items = dict(state=self._ocp.args.StandardSave(state),
                 history=self._ocp.args.JsonSave(history))
    if store is not None:
      items["warm_start"] = self._ocp.args.StandardSave(
          {"z": store[0], "seen": store[1]})
    self.manager.save(epoch, args=self._ocp.args.Composite(**items))
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
  _check_output_paths(config)
  _check_resume(config, experiment)
  if config.distributed:
    jax.distributed.initialize(coordinator_address=config.coordinator_address,
                               num_processes=config.num_processes,
                               process_id=config.process_id)
  dataset = data_lib.load(config.dataset, config.data_dir).check_not_empty(
      ).limit(config.limit_train, config.limit_test)
  devices = jax.devices()
  if config.batch_size % len(devices):
    raise ValueError(f"--batch-size {config.batch_size} must be a multiple of"
                     f" the {len(devices)} devices")
  steps_per_epoch = len(dataset.train_images) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(dataset.train_images)} training examples are"
                     f" fewer than one batch of {config.batch_size}")
  dropped = len(dataset.train_images) - steps_per_epoch * config.batch_size
  if dropped:
    _log(f"note: --batch-size {config.batch_size} does not divide the"
          f" {len(dataset.train_images)} training examples: {dropped} are"
          " left out of each epoch (a different random subset every epoch)")
  mesh = Mesh(np.asarray(devices), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

  train_images, train_labels, test_images, test_labels = _put(
      (dataset.train_images, dataset.train_labels, dataset.test_images,
       dataset.test_labels), replicated)
  shuffle = jax.jit(functools.partial(epoch_order, config.seed,
                                      size=len(dataset.train_images)),
                    out_shardings=replicated)

  @jax.jit
  def batch_rows(order, index):
    return jax.lax.dynamic_slice_in_dim(order, index * config.batch_size,
                                        config.batch_size)

  @jax.jit
  def gather(images, labels, order, index):
    rows = batch_rows(order, index)
    batch = images[rows], labels[rows]
    return jax.lax.with_sharding_constraint(batch, batch_sharding)

  model = experiment.make_model(nnx.Rngs(config.seed), config.deq_options)
  optimizer = nnx.Optimizer(
      model, guarded(experiment.make_optimizer(steps_per_epoch, config.epochs),
                     config.skip_grad_norm),
      wrt=nnx.Param)
  metrics, test_metrics = train_metrics(), eval_metrics()
  objects = (model, optimizer, metrics, test_metrics)
  nnx.update(objects, _put(nnx.state(objects), replicated))
  train_step, eval_step = make_steps(
      experiment, config.skip_grad_norm,
      penalty_weight=config.deq_options.jacobian_penalty,
      fp_weights=config.fp_weights(), warm_start=config.warm_start)
  diagnostics = make_diagnostics(experiment)
  store = None
  if config.warm_start:
    store = _warm_start_store(experiment, model, dataset.train_images[:1],
                              len(dataset.train_images), replicated)

  checkpoints = _Checkpoints(config.workdir)
  start_epoch, history, store = checkpoints.restore(model, optimizer, store)
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model,
                                                             nnx.Param)))
  _log(f"{experiment.name}: {dataset.source}; {len(dataset.train_images)}"
        f" train / {len(dataset.test_images)} test examples;"
        f" {num_params:,} parameters; {len(devices)} device(s)"
        f" ({devices[0].platform})"
        + (f" in {jax.process_count()} processes"
           if jax.process_count() > 1 else "")
        + (f"; resuming after epoch {start_epoch}" if start_epoch else ""))
  _log(_header())
  first_process = jax.process_index() == 0
  if config.metrics_out and first_process:
    _write_metrics(config.metrics_out, history)
  for row in history:
    _log(_format_row(row))
  if start_epoch >= config.epochs:
    _log(f"the run in {config.workdir} is already complete: it holds"
          f" {start_epoch} epoch{'s' if start_epoch != 1 else ''}"
          f" (--epochs {config.epochs}); nothing to"
          " train. Ask for more --epochs to continue it, or use a new"
          " --workdir.")
    return history

  test_batches = -(-len(dataset.test_images) // config.batch_size)
  test_order, test_mask = _put(
      (np.arange(test_batches * config.batch_size) % len(dataset.test_images),
       # The last test batch is padded with repeats that the mask leaves out.
       (np.arange(test_batches * config.batch_size) < len(dataset.test_images)
        ).reshape(test_batches, config.batch_size)), replicated)
  for epoch in range(start_epoch + 1, config.epochs + 1):
    order = shuffle(epoch)
    model.train()
    metrics.reset()
    bar = _progress(steps_per_epoch, config.progress and first_process,
                    f"epoch {epoch}")
    if epoch == start_epoch + 1 and bar.disable:
      # Without a progress bar the first epoch is a long silence otherwise.
      _log(f"epoch {epoch}: compiling the training step, then"
           f" {steps_per_epoch} steps...")
    started = time.perf_counter()
    for index in range(steps_per_epoch):
      images, labels = gather(train_images, train_labels, order, index)
      rows = batch_rows(order, index) if store is not None else None
      store = train_step(model, optimizer, metrics, images, labels, store,
                         rows)
      if bar.disable is False and (index % 50 == 49
                                   or index == steps_per_epoch - 1):
        bar.set_postfix(loss=f"{_compute(metrics)['loss']:.4f}")
        bar.update(index + 1 - bar.n)
    train = _compute(metrics)  # waits for the epoch's steps
    train_seconds = time.perf_counter() - started
    bar.close()

    model.eval()
    test_metrics.reset()
    started = time.perf_counter()
    for i in range(test_batches):
      eval_step(model, test_metrics,
                *gather(test_images, test_labels, test_order, i), test_mask[i])
    test = _compute(test_metrics)
    test_seconds = time.perf_counter() - started
    penalty, rho, rho_max = (float(v) for v in diagnostics(
        model, test_images[:config.batch_size],
        jax.random.fold_in(jax.random.key(config.seed), epoch)))
    n_train = steps_per_epoch * config.batch_size
    row = {
        "epoch": epoch,
        "train_error": train["error"],
        "train_loss": train["loss"],
        "test_error": test["error"],
        "test_loss": test["loss"],
        "forward_steps": train["forward_steps"],
        "test_forward_steps": test["forward_steps"],
        "backward_steps": train["backward_steps"],
        "skipped_steps": int(metrics.skipped.total[...]),
        "train_seconds": round(train_seconds, 3),
        "test_seconds": round(test_seconds, 3),
        "examples_per_second": round(n_train / train_seconds, 1),
        "train_penalty": train["penalty"],
        "jacobian_penalty": penalty,
        "spectral_radius": rho,
        "spectral_radius_max": rho_max,
    }
    history.append(row)
    _log(_format_row(row))
    checkpoints.save(epoch, model, optimizer, history, store)
    if first_process:
      if config.workdir and epoch == start_epoch + 1:
        _write_run_record(config, experiment)
      if config.metrics_out:
        _write_metrics(config.metrics_out, history)
  if config.plots:
    from experiments.common import plots

    # Every process computes the figures (their solves run on every
    # device); the first one writes them.
    directory = config.plots if first_process else None
    plots.write_all(directory, experiment, model, history,
                    experiment.preprocess(test_images[:config.batch_size]))
    _log(f"plots written to {config.plots}")
  return history


_COLUMNS = (("epoch", "{:>5d}"), ("train_error", "{:>11.4f}"),
            ("train_loss", "{:>10.4f}"), ("test_error", "{:>10.4f}"),
            ("test_loss", "{:>9.4f}"), ("forward_steps", "{:>13.2f}"),
            ("test_forward_steps", "{:>18.2f}"),
            ("backward_steps", "{:>14.2f}"), ("skipped_steps", "{:>13d}"),
            ("spectral_radius", "{:>15.3f}"),
            ("train_seconds", "{:>13.2f}"), ("test_seconds", "{:>12.2f}"))


def _header() -> str:
  return " ".join(f"{name:>{len(fmt.format(0))}}" if "d" in fmt else
                  f"{name:>{len(fmt.format(0.0))}}" for name, fmt in _COLUMNS)


def _format_row(row: dict) -> str:
  # Rows from runs saved before a column existed print NaN there.
  return " ".join(fmt.format(row.get(name, float("nan")) if "d" not in fmt
                             else row.get(name, 0)) for name, fmt in _COLUMNS)


# Config fields that do not change what a run computes: they may differ
# between a run and its resumption.
_RESUMABLE_FIELDS = ("model", "epochs", "data_dir", "metrics_out", "workdir",
                     "plots", "progress", "distributed", "coordinator_address",
                     "num_processes", "process_id")
_RUN_RECORD = "run.json"


def _run_identity(config: Config, experiment: Experiment) -> dict:
  """The settings a resumed run must share with the run saved in workdir,
  keyed by their command-line flag."""
  identity = {"experiment (--layer / --model)": experiment.name}
  for field in dataclasses.fields(config):
    if field.name in _RESUMABLE_FIELDS or field.name == "deq_options":
      continue
    value = getattr(config, field.name)
    if field.name == "fp_weight":
      value = list(config.fp_weights())
    identity["--" + field.name.replace("_", "-")] = value
  options = config.deq_options
  identity.update({
      "--jacobian-penalty": options.jacobian_penalty,
      "--fp-correction": list(options.record_steps),
      "--weight-norm / --spectral-norm": options.normalization,
      "--dropout": options.dropout,
      "--eval-max-steps": options.eval_max_steps,
  })
  return json.loads(json.dumps(identity))


def _check_resume(config: Config, experiment: Experiment) -> None:
  """Refuses to resume a run in workdir that was started with other flags."""
  if not config.workdir:
    return
  record = Path(config.workdir) / _RUN_RECORD
  if not record.is_file():
    return
  try:
    saved = json.loads(record.read_text())
  except (OSError, ValueError) as error:
    raise ValueError(f"{record}: unreadable ({error}); it records the flags"
                     " of the run saved in --workdir") from error
  now = _run_identity(config, experiment)
  differ = [f"{key}: {saved.get(key)!r} there, {now.get(key)!r} now"
            for key in sorted(set(saved) | set(now))
            if saved.get(key) != now.get(key)]
  if differ:
    raise ValueError(
        f"--workdir {config.workdir} holds a run started with other settings;"
        " resuming would mix the two. Differences: " + "; ".join(differ)
        + ". Use the saved flags to resume it, or a new --workdir.")


def _write_run_record(config: Config, experiment: Experiment) -> None:
  record = Path(config.workdir) / _RUN_RECORD
  if record.is_file():
    return
  temporary = record.with_suffix(".tmp")
  temporary.write_text(json.dumps(_run_identity(config, experiment),
                                  indent=1))
  os.replace(temporary, record)


def _check_output_paths(config: Config) -> None:
  """One-line errors, before any work, for outputs that cannot be written."""

  def writable_ancestor(path: Path, flag: str) -> None:
    ancestor = path.absolute()
    while not ancestor.exists():
      ancestor = ancestor.parent
    if not ancestor.is_dir():
      raise ValueError(f"{flag} {path}: {ancestor} is a file, not a"
                       " directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
      raise ValueError(f"{flag} {path}: {ancestor} is not writable")

  for flag, value in (("--workdir", config.workdir),
                      ("--plots", config.plots)):
    if value:
      path = Path(value)
      if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {value} is a file; it must be a directory")
      writable_ancestor(path, flag)
  if config.metrics_out:
    path = Path(config.metrics_out)
    if path.is_dir():
      raise ValueError(f"--metrics-out {path} is a directory; it must be a"
                       " file path (one JSON line per epoch)")
    writable_ancestor(path.parent, "--metrics-out")


def _warm_start_store(experiment, model, example_images, size, sharding):
  """Zeros for each training example's z* and an all-False seen mask."""
  shapes = jax.eval_shape(
      lambda m, x: experiment.forward(m, experiment.preprocess(x), None)[2],
      model, example_images)
  nbytes = sum(size * int(np.prod(s.shape[1:])) * 4
               for s in jax.tree.leaves(shapes))
  if nbytes > WARM_START_MAX_BYTES:
    raise ValueError(
        f"--warm-start would keep {nbytes / 2**30:.1f} GiB of z* on the"
        f" devices ({size} examples); the limit is"
        f" {WARM_START_MAX_BYTES / 2**30:.0f} GiB: use --limit-train")
  zeros = jax.tree.map(
      lambda s: np.zeros((size,) + s.shape[1:], np.float32), shapes)
  return _put((zeros, np.zeros((size,), bool)), sharding)


def _write_metrics(path: str, history: list[dict]) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  temporary = path + ".tmp"
  with open(temporary, "w") as handle:
    for row in history:
      handle.write(json.dumps(row) + "\n")
  os.replace(temporary, path)
