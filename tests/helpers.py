"""Small synthetic data sets in the on-disk formats the experiments read."""

import gzip
import os
import pickle

import numpy as np


def write_idx(path, array, magic, compress=True):
  header = magic.to_bytes(4, "big")
  for dim in array.shape:
    header += int(dim).to_bytes(4, "big")
  payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
  opener = gzip.open if compress else open
  with opener(path, "wb") as handle:
    handle.write(payload)


def learnable_images(labels, shape, seed):
  """Images whose mean brightness pattern encodes the label (easy to fit)."""
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 60, (len(labels),) + shape)
  stripes = np.zeros((10,) + shape)
  for k in range(10):
    stripes[k].reshape(-1)[k::10] = 180
  return np.clip(base + stripes[labels], 0, 255).astype(np.uint8)


def write_mnist_like(directory, n_train=300, n_test=100, seed=0,
                     compress=True):
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  for split, n in (("train", n_train), ("t10k", n_test)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = learnable_images(labels, (28, 28), seed + n)
    suffix = ".gz" if compress else ""
    write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte{suffix}"),
              images, 2051, compress)
    write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte{suffix}"),
              labels, 2049, compress)
  return directory


def write_cifar_like(directory, per_batch=40, seed=0):
  folder = os.path.join(directory, "cifar-10-batches-py")
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)]
                           + ["test_batch"]):
    labels = rng.integers(0, 10, per_batch)
    images = learnable_images(labels, (3, 32, 32), seed + i)
    with open(os.path.join(folder, name), "wb") as handle:
      pickle.dump({b"data": images.reshape(per_batch, 3072),
                   b"labels": labels.tolist()}, handle)
  return directory


def tanh_map(z, args):
  """z -> tanh(z W + x), the tutorial's cell as a plain function."""
  import jax.numpy as jnp
  w, x = args
  return jnp.tanh(z @ w + x)


def small_tanh_problem():
  """(W, x) of a contractive 6-wide tanh map and a batch of 4 inputs."""
  import jax
  w = 0.5 * jax.random.normal(jax.random.key(0), (6, 6)) / np.sqrt(6)
  x = jax.random.normal(jax.random.key(1), (4, 6))
  return w, x
