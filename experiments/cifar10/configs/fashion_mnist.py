"""The conv DEQ on real images that a CPU can train (docs/experiments.md,
"Measured"): 4,000 Fashion-MNIST training images, 3 epochs.

  python -m experiments.cifar10 --config experiments/cifar10/configs/fashion_mnist.py
"""

import dataclasses

from experiments.cifar10.configs import default


def get_config():
  return dataclasses.replace(default.get_config(), dataset="fashion_mnist",
                             epochs=3, limit_train=4000, limit_test=1000)
