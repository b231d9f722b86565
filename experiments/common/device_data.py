"""The data of a run on the devices: placing host values on a sharding,
cutting batches there, and the warm-start store of each example's z*."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np

from experiments.common.config import Config
from experiments.common.steps import epoch_order

# Warm starts keep one z* per training example on the devices; past this
# many bytes the flag is refused rather than exhausting device memory.
WARM_START_MAX_BYTES = 2 << 30


def put(tree, sharding):
  """Values every process holds alike onto `sharding`, which may span the
  devices of several processes (`jax.device_put` cannot take a jax.Array
  there, and compares numpy values across processes, NaN != NaN)."""

  def put_array(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding,
                                        lambda index: x[index])

  def put_leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put_array(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    return put_array(x)

  return jax.tree.map(put_leaf, tree)


class Batches(NamedTuple):
  """Jitted functions that cut batches from the data on the devices."""

  shuffle: object  # epoch -> the epoch's permutation of the training set
  rows: object  # (order, index) -> the rows of batch `index`
  gather: object  # (images, labels, order, index) -> the sharded batch


def batches(config: Config, size: int, replicated, batch_sharding
            ) -> Batches:
  """`Batches` of `config.batch_size` rows from `size` examples."""
  shuffle = jax.jit(functools.partial(epoch_order, config.seed, size=size),
                    out_shardings=replicated)

  @jax.jit
  def rows(order, index):
    return jax.lax.dynamic_slice_in_dim(order, index * config.batch_size,
                                        config.batch_size)

  @jax.jit
  def gather(images, labels, order, index):
    chosen = rows(order, index)
    batch = images[chosen], labels[chosen]
    return jax.lax.with_sharding_constraint(batch, batch_sharding)

  return Batches(shuffle, rows, gather)


def warm_start_store(experiment, model, example_images, size, sharding):
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
  return put((zeros, np.zeros((size,), bool)), sharding)
