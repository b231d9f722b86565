"""`train_and_evaluate` for CIFAR-10: Adam 1e-3, cosine decay to 1e-6."""

from __future__ import annotations

import optax

from experiments.cifar10 import input_pipeline, models
from experiments.common import training


def make_optimizer(steps_per_epoch: int, epochs: int):
  total = steps_per_epoch * epochs
  schedule = optax.cosine_decay_schedule(1e-3, decay_steps=total,
                                         alpha=1e-6 / 1e-3)
  return optax.adam(schedule)


EXPERIMENT = training.Experiment(
    name="cifar10/deq_resnet",
    make_model=models.CifarDEQ,
    make_optimizer=make_optimizer,
    preprocess=input_pipeline.preprocess,
    deq=lambda model: model.deq,
    deq_input=lambda model, x: model.features(x),
)


def train_and_evaluate(config: training.Config) -> list[dict]:
  """Trains the tutorial's CIFAR-10 DEQ; returns epoch metrics."""
  return training.train_and_evaluate(config, EXPERIMENT)
