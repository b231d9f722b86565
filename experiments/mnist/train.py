"""`train_and_evaluate` for the MNIST layers: SGD 0.1, 0.01 from epoch 5."""

from __future__ import annotations

import functools

import optax

from experiments.common import training
from experiments.mnist import input_pipeline, models


def make_optimizer(steps_per_epoch: int, epochs: int):
  del epochs
  schedule = optax.piecewise_constant_schedule(
      0.1, {5 * steps_per_epoch: 0.1})
  return optax.sgd(schedule)


def experiment(layer: str) -> training.Experiment:
  models.get_layer(layer)
  return training.Experiment(
      name=f"mnist/{layer}",
      make_model=functools.partial(models.make_model, layer),
      make_optimizer=make_optimizer,
      preprocess=input_pipeline.preprocess,
      deq=lambda model: model.layers[1],
      deq_input=lambda model, x: model.layers[0](x),
      forward=models.forward,
  )


def train_and_evaluate(config: training.Config,
                       layer: str | None = None) -> list[dict]:
  """Trains the tutorial's MNIST model with `layer` (default:
  `config.model`); returns epoch metrics."""
  layer = layer or config.model
  if config.dataset not in input_pipeline.DATASETS:
    raise ValueError(f"unknown --dataset {config.dataset!r}; choose one of"
                     f" {', '.join(input_pipeline.DATASETS)}")
  return training.train_and_evaluate(config, experiment(layer))
