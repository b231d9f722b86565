"""The tutorial's MNIST run, on Fashion-MNIST: `python -m experiments.mnist`.

Copy this file, change what you need and pass it with `--config FILE`;
command-line flags override it. `epochs=None` takes the layer's tutorial
default (8 for the unrolled Newton layers, 10 otherwise).
"""

from experiments.common import layers, training


def get_config() -> training.Config:
  return training.Config(
      dataset="fashion_mnist",  # or "mnist" (tfds, or IDX files via data_dir)
      model="deq",  # --layer: fixed_point, newton, newton_implicit, ...
      data_dir=None,  # None: Debian's Fashion-MNIST, else tfds
      epochs=None,
      batch_size=100,
      seed=0,
      deq_options=layers.DeqOptions(),  # the stabilisers, all off
  )
