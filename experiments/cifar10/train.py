"""`train_and_evaluate` for CIFAR-10: Adam 1e-3, cosine decay to 1e-6."""

from __future__ import annotations

import functools

import optax

from experiments.cifar10 import input_pipeline, models
from experiments.common import training


def make_optimizer(steps_per_epoch: int, epochs: int):
  total = steps_per_epoch * epochs
  schedule = optax.cosine_decay_schedule(1e-3, decay_steps=total,
                                         alpha=1e-6 / 1e-3)
  return optax.adam(schedule)


DATASETS = {"cifar10": 3, "fashion_mnist": 1, "mnist": 1}  # -> channels


def experiment(model: str = "deq_resnet",
               dataset: str = "cifar10") -> training.Experiment:
  if model not in models.MODELS:
    raise ValueError(f"unknown --model {model!r}; choose one of"
                     f" {', '.join(models.MODELS)}")
  if dataset not in DATASETS:
    raise ValueError(f"unknown --dataset {dataset!r}; choose one of"
                     f" {', '.join(DATASETS)}")
  make = functools.partial(models.MODELS[model],
                           in_channels=DATASETS[dataset])
  return training.Experiment(
      name=f"{dataset}/{model}",
      make_model=make,
      make_optimizer=make_optimizer,
      preprocess=input_pipeline.preprocess,
      deq=lambda model: model.deq,
      deq_input=lambda model, x: model.features(x),
      forward=lambda model, inputs, warm: model.forward(inputs, warm),
  )


EXPERIMENT = experiment("deq_resnet", "cifar10")


def train_and_evaluate(config: training.Config,
                       model: str | None = None) -> list[dict]:
  """Trains a convolutional DEQ (`model`, default `config.model` or
  deq_resnet: deq_resnet or mdeq_small) on `config.dataset` (CIFAR-10, or
  MNIST-format images: 1 channel, 28x28)."""
  model = model or config.model or "deq_resnet"
  return training.train_and_evaluate(config, experiment(model,
                                                        config.dataset))
