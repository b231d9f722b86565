"""The tutorial's CIFAR-10 run: `python -m experiments.cifar10`.

Adam 1e-3 with cosine decay over 50 epochs, batch 100. Copy this file and
pass it with `--config FILE`; command-line flags override it.
"""

from experiments.common import layers, training


def get_config() -> training.Config:
  return training.Config(
      dataset="cifar10",  # or "fashion_mnist" / "mnist" (1 channel, 28x28)
      model="deq_resnet",  # or "mdeq_small"
      data_dir=None,  # CIFAR-10 python batches, else tfds
      epochs=50,
      batch_size=100,
      seed=0,
      deq_options=layers.DeqOptions(),
  )
