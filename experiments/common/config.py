"""A run's settings: `Config`, checked once by `validate()`."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from experiments.common import layers


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
  # None: weight 1 for every correction state (needs record_steps if set).
  fp_weight: Union[None, float, tuple[float, ...]] = None
  warm_start: bool = False

  def validate(self) -> None:
    options = self.deq_options
    if not options.jacobian_penalty >= 0:
      raise ValueError(f"--jacobian-penalty must be >= 0, got"
                       f" {options.jacobian_penalty}")
    if not 0 <= options.dropout < 1:
      raise ValueError(f"--dropout must be in [0, 1), got {options.dropout}")
    for flag, value in (("--data-dir", self.data_dir),
                        ("--workdir", self.workdir), ("--plots", self.plots),
                        ("--metrics-out", self.metrics_out)):
      if value is not None and not str(value).strip():
        raise ValueError(f"{flag} is empty; leave the flag out instead")
    weights = self.fp_weights()
    if not all(w > 0 for w in weights):
      raise ValueError(f"--fp-weight must be > 0, got {self.fp_weight}")
    steps = len(options.record_steps)
    if self.fp_weight is not None and not steps:
      raise ValueError("--fp-weight weighs the fixed-point correction's"
                       " losses: it needs --fp-correction")
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
    if self.fp_weight is None:
      return (1.0,)
    if isinstance(self.fp_weight, (int, float)):
      return (float(self.fp_weight),)
    return tuple(float(w) for w in self.fp_weight)
