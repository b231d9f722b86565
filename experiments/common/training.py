"""The training loop both experiments share: jitted NNX + optax steps.

Data lives on the devices for the whole run (uint8), each epoch is shuffled
from the seed and batched by a jitted gather, so no batch crosses the host.
Batches are sharded over a 1-D mesh of every device of every process
(`--distributed` starts several) and parameters are replicated: `jit` inserts
the gradient all-reduce. Metrics accumulate on the devices in an
`nnx.MultiMetric` and reach the host once per epoch. Checkpoints (orbax) are
written after every epoch, and a restarted run resumes from the last one.

The pieces live by concern: `config` (the settings), `steps` (the jitted
steps), `checkpoints` (orbax and the resume record), `outputs` (log, table,
metrics files); this module joins them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments.common import checkpoints as checkpoints_lib
from experiments.common import data as data_lib
from experiments.common import device_data
from experiments.common import outputs
from experiments.common import steps as steps_lib
from experiments.common.config import Config
from experiments.common.outputs import METRIC_KEYS, log
from experiments.common.steps import Experiment, epoch_order

__all__ = ["Config", "Experiment", "METRIC_KEYS", "epoch_order",
           "train_and_evaluate"]


def train_and_evaluate(config: Config, experiment: Experiment) -> list[dict]:
  """Trains, evaluates every epoch, writes metrics, checkpoints and plots.

  Returns:
    One dict of metrics per epoch (the keys of `METRIC_KEYS`).
  """
  config.validate()
  outputs.check_paths(config)
  checkpoints_lib.check_resume(config, experiment)
  if config.distributed:
    jax.distributed.initialize(coordinator_address=config.coordinator_address,
                               num_processes=config.num_processes,
                               process_id=config.process_id)
  dataset, steps_per_epoch = _load(config)
  run = _Run.build(config, experiment, dataset, steps_per_epoch)
  checkpoints = checkpoints_lib.Checkpoints(config.workdir)
  start, history, run.store = checkpoints.restore(
      run.model, run.optimizer, run.store, put=device_data.put)
  _log_start(config, experiment, dataset, run.model, start, history)
  if start >= config.epochs:
    log(f"the run in {config.workdir} is already complete: it holds {start}"
        f" epoch{'s' if start != 1 else ''} (--epochs {config.epochs});"
        " nothing to train. Ask for more --epochs to continue it, or use a"
        " new --workdir.")
    return history
  first_process = jax.process_index() == 0
  for epoch in range(start + 1, config.epochs + 1):
    row = {"epoch": epoch,
           **run.train_epoch(epoch, announce=epoch == start + 1),
           **run.evaluate(epoch)}
    history.append(row)
    log(outputs.format_row(row))
    with _interrupts_deferred():  # Ctrl-C never cuts an epoch's outputs short
      checkpoints.save(epoch, run.model, run.optimizer, history, run.store)
      if first_process:
        if config.workdir and epoch == start + 1:
          checkpoints_lib.write_run_record(config, experiment)
        if config.metrics_out:
          outputs.write_metrics(config.metrics_out, history)
  if config.plots:
    from experiments.common import plots

    # Every process computes the figures (their solves run on every
    # device); the first one writes them.
    plots.write_all(config.plots if first_process else None, experiment,
                    run.model, history,
                    experiment.preprocess(run.test_images[:config.batch_size]))
    log(f"plots written to {config.plots}")
  return history


@contextlib.contextmanager
def _interrupts_deferred():
  """Holds SIGINT (Ctrl-C) until the block has run, then raises it."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT,
                           lambda number, frame: received.append(number))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if received:
    raise KeyboardInterrupt


def _load(config: Config) -> tuple[data_lib.Dataset, int]:
  """The data set and the number of training steps per epoch."""
  dataset = data_lib.load(config.dataset, config.data_dir).check_not_empty(
      ).limit(config.limit_train, config.limit_test)
  devices = jax.device_count()
  if config.batch_size % devices:
    raise ValueError(f"--batch-size {config.batch_size} must be a multiple of"
                     f" the {devices} devices")
  steps_per_epoch = len(dataset.train_images) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(dataset.train_images)} training examples are"
                     f" fewer than one batch of {config.batch_size}")
  dropped = len(dataset.train_images) - steps_per_epoch * config.batch_size
  if dropped:
    log(f"note: --batch-size {config.batch_size} does not divide the"
        f" {len(dataset.train_images)} training examples: {dropped} are"
        " left out of each epoch (a different random subset every epoch)")
  return dataset, steps_per_epoch


def _log_start(config, experiment, dataset, model, start, history) -> None:
  """The run's header line, the table's header and the rows resumed."""
  devices = jax.devices()
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model,
                                                             nnx.Param)))
  log(f"{experiment.name}: {dataset.source}; {len(dataset.train_images)}"
      f" train / {len(dataset.test_images)} test examples;"
      f" {num_params:,} parameters; {len(devices)} device(s)"
      f" ({devices[0].platform})"
      + (f" in {jax.process_count()} processes"
         if jax.process_count() > 1 else "")
      + (f"; resuming after epoch {start}" if start else ""))
  log(outputs.header())
  if config.metrics_out and jax.process_index() == 0:
    outputs.write_metrics(config.metrics_out, history)
  for row in history:
    log(outputs.format_row(row))


class _Run:
  """The model, optimiser, metrics, steps and data of one run, on devices."""

  @classmethod
  def build(cls, config: Config, experiment: Experiment,
            dataset: data_lib.Dataset, steps_per_epoch: int) -> "_Run":
    run = cls()
    run.config, run.experiment = config, experiment
    run.steps_per_epoch = steps_per_epoch
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    run.batches = device_data.batches(config, len(dataset.train_images), replicated,
                           NamedSharding(mesh, PartitionSpec("data")))
    (run.train_images, run.train_labels, run.test_images,
     run.test_labels) = device_data.put((dataset.train_images, dataset.train_labels,
                              dataset.test_images, dataset.test_labels),
                             replicated)
    run.model = experiment.make_model(nnx.Rngs(config.seed),
                                      config.deq_options)
    run.optimizer = nnx.Optimizer(run.model, steps_lib.guarded(
        experiment.make_optimizer(steps_per_epoch, config.epochs),
        config.skip_grad_norm), wrt=nnx.Param)
    run.metrics = steps_lib.train_metrics()
    run.test_metrics = steps_lib.eval_metrics()
    objects = (run.model, run.optimizer, run.metrics, run.test_metrics)
    nnx.update(objects, device_data.put(nnx.state(objects), replicated))
    run.train_step, run.eval_step = steps_lib.make_steps(
        experiment, config.skip_grad_norm,
        penalty_weight=config.deq_options.jacobian_penalty,
        fp_weights=config.fp_weights(), warm_start=config.warm_start)
    run.diagnostics = steps_lib.make_diagnostics(experiment)
    run.store = None
    if config.warm_start:
      run.store = device_data.warm_start_store(experiment, run.model,
                                    dataset.train_images[:1],
                                    len(dataset.train_images), replicated)
    test_batches = -(-len(dataset.test_images) // config.batch_size)
    padded = np.arange(test_batches * config.batch_size)
    # The last test batch is padded with repeats that the mask leaves out.
    run.test_order, run.test_mask = device_data.put(
        (padded % len(dataset.test_images),
         (padded < len(dataset.test_images)).reshape(test_batches, -1)),
        replicated)
    return run

  def train_epoch(self, epoch: int, announce: bool) -> dict:
    """One epoch of training steps; its metrics and timing."""
    config, n = self.config, self.steps_per_epoch
    order = self.batches.shuffle(epoch)
    self.model.train()
    self.metrics.reset()
    bar = outputs.progress(n, config.progress and jax.process_index() == 0,
                           f"epoch {epoch}")
    if announce and bar.disable:
      # Without a progress bar the first epoch is a long silence otherwise.
      log(f"epoch {epoch}: compiling the training step, then {n} steps...")
    started = time.perf_counter()
    for index in range(n):
      images, labels = self.batches.gather(self.train_images,
                                           self.train_labels, order, index)
      rows = (self.batches.rows(order, index) if self.store is not None
              else None)
      self.store = self.train_step(self.model, self.optimizer, self.metrics,
                                   images, labels, self.store, rows)
      if not bar.disable and (index % 50 == 49 or index == n - 1):
        bar.set_postfix(loss=f"{steps_lib.compute(self.metrics)['loss']:.4f}")
        bar.update(index + 1 - bar.n)
    train = steps_lib.compute(self.metrics)  # waits for the epoch's steps
    seconds = time.perf_counter() - started
    bar.close()
    return {
        "train_error": train["error"], "train_loss": train["loss"],
        "forward_steps": train["forward_steps"],
        "backward_steps": train["backward_steps"],
        "skipped_steps": int(self.metrics.skipped.total[...]),
        "train_seconds": round(seconds, 3),
        "examples_per_second": round(n * config.batch_size / seconds, 1),
        "train_penalty": train["penalty"],
    }

  def evaluate(self, epoch: int) -> dict:
    """Test metrics, timing, and the Jacobian diagnostics at z*."""
    self.model.eval()
    self.test_metrics.reset()
    started = time.perf_counter()
    for i in range(len(self.test_mask)):
      self.eval_step(self.model, self.test_metrics, *self.batches.gather(
          self.test_images, self.test_labels, self.test_order, i),
                     self.test_mask[i])
    test = steps_lib.compute(self.test_metrics)
    seconds = time.perf_counter() - started
    key = jax.random.fold_in(jax.random.key(self.config.seed), epoch)
    penalty, rho, rho_max = (float(v) for v in self.diagnostics(
        self.model, self.test_images[:self.config.batch_size], key))
    return {"test_error": test["error"], "test_loss": test["loss"],
            "test_forward_steps": test["forward_steps"],
            "test_seconds": round(seconds, 3), "jacobian_penalty": penalty,
            "spectral_radius": rho, "spectral_radius_max": rho_max}
