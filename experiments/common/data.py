"""Readers for MNIST-format IDX files, CIFAR-10 python batches and tfds.

Every reader validates what it reads and says exactly what is wrong with a bad
or truncated file. Arrays come back as uint8 images (N, H, W, C) and int32
labels (N,).
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


class DataError(RuntimeError):
  """A data set is missing, unreadable or malformed."""


class Dataset(NamedTuple):
  """Images (N, H, W, C) uint8 and labels (N,) int32 for both splits."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  source: str

  def check_not_empty(self) -> "Dataset":
    """Refuses a split without examples (before any training)."""
    for split, images in (("training", self.train_images),
                          ("test", self.test_images)):
      if len(images) == 0:
        raise DataError(f"{self.source}: the {split} split has no examples")
    return self

  def limit(self, train: Optional[int], test: Optional[int]) -> "Dataset":
    """The first `train` / `test` examples (None keeps all)."""
    for name, n in (("limit-train", train), ("limit-test", test)):
      if n is not None and n < 1:
        raise ValueError(f"--{name} must be >= 1, got {n}")
    return self._replace(
        train_images=self.train_images[:train],
        train_labels=self.train_labels[:train],
        test_images=self.test_images[:test],
        test_labels=self.test_labels[:test])


def _open(path: Path):
  return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _find_idx(directory: Path, stem: str) -> Optional[Path]:
  for candidate in (directory / (stem + ".gz"), directory / stem):
    if candidate.is_file():
      return candidate
  return None


def read_idx(path: os.PathLike, expected_magic: int) -> np.ndarray:
  """Reads one IDX file (gzipped or not), validating header and length.

  Args:
    path: the file.
    expected_magic: 2051 for images, 2049 for labels.

  Returns:
    uint8 array shaped by the header's dimensions.
  """
  path = Path(path)
  try:
    with _open(path) as handle:
      raw = handle.read()
  except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as error:
    raise DataError(f"{path}: cannot read ({type(error).__name__}: {error});"
                    " the file is corrupt or truncated") from error
  if len(raw) < 8:
    raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
  magic = int.from_bytes(raw[:4], "big")
  if magic != expected_magic:
    kind = "images" if expected_magic == _IMAGES_MAGIC else "labels"
    raise DataError(f"{path}: magic number {magic}, expected {expected_magic}"
                    f" for IDX {kind}; this is not an MNIST-format {kind} file")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path}: truncated header")
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  expected = header + int(np.prod(dims))
  if len(raw) != expected:
    raise DataError(f"{path}: {len(raw)} bytes but the header {dims} needs"
                    f" {expected}; the file is truncated or padded")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_idx_dataset(directory: os.PathLike, name: str = "mnist") -> Dataset:
  """Reads the four MNIST-format files from `directory` and checks them."""
  directory = Path(directory)
  paths = {key: _find_idx(directory, stem) for key, stem in IDX_FILES.items()}
  missing = [IDX_FILES[k] + "[.gz]" for k, p in paths.items() if p is None]
  if missing:
    raise DataError(f"{directory}: missing {', '.join(missing)}")
  arrays = {
      key: read_idx(path, _IMAGES_MAGIC if key.endswith("images")
                    else _LABELS_MAGIC) for key, path in paths.items()
  }
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.ndim != 3:
      raise DataError(f"{paths[split + '_images']}: images must have 3"
                      f" dimensions (N, rows, cols), got {images.shape}")
    if labels.ndim != 1:
      raise DataError(f"{paths[split + '_labels']}: labels must have 1"
                      f" dimension, got {labels.shape}")
    if len(images) != len(labels):
      raise DataError(f"{directory}: {split} has {len(images)} images but"
                      f" {len(labels)} labels")
    if labels.size and labels.max() > 9:
      raise DataError(f"{paths[split + '_labels']}: label {labels.max()} is"
                      " outside 0..9")
  return Dataset(arrays["train_images"][..., None],
                 arrays["train_labels"].astype(np.int32),
                 arrays["test_images"][..., None],
                 arrays["test_labels"].astype(np.int32), 10,
                 f"{name} IDX files in {directory}")


def read_cifar10_batches(directory: os.PathLike) -> Dataset:
  """Reads CIFAR-10's python batches (data_batch_1..5, test_batch).

  `directory` may be the `cifar-10-batches-py` folder or its parent.
  """
  directory = Path(directory)
  if (directory / "cifar-10-batches-py").is_dir():
    directory = directory / "cifar-10-batches-py"
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  missing = [n for n in names if not (directory / n).is_file()]
  if missing:
    raise DataError(f"{directory}: missing CIFAR-10 python batches"
                    f" {', '.join(missing)}")
  images, labels = [], []
  for name in names:
    path = directory / name
    try:
      with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    except Exception as error:  # pickle raises many types on corrupt input
      raise DataError(f"{path}: cannot unpickle ({type(error).__name__}:"
                      f" {error}); the file is corrupt or truncated") from error
    if not isinstance(batch, dict) or b"data" not in batch or (
        b"labels" not in batch):
      raise DataError(f"{path}: not a CIFAR-10 batch (needs 'data' and"
                      " 'labels')")
    data = np.asarray(batch[b"data"])
    batch_labels = np.asarray(batch[b"labels"])
    if batch_labels.size and not np.issubdtype(batch_labels.dtype,
                                               np.integer):
      raise DataError(f"{path}: labels must be integers 0..9, got dtype"
                      f" {batch_labels.dtype} (e.g. {batch_labels[0]!r})")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
      raise DataError(f"{path}: data must be uint8 (N, 3072), got"
                      f" {data.dtype} {data.shape}")
    if batch_labels.shape != (data.shape[0],):
      raise DataError(f"{path}: {data.shape[0]} images but labels of shape"
                      f" {batch_labels.shape}")
    if batch_labels.size and (batch_labels.min() < 0
                              or batch_labels.max() > 9):
      raise DataError(f"{path}: labels outside 0..9")
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(batch_labels.astype(np.int32))
  return Dataset(np.concatenate(images[:5]), np.concatenate(labels[:5]),
                 images[5], labels[5], 10,
                 f"CIFAR-10 python batches in {directory}")


def read_tfds(name: str, data_dir: Optional[str]) -> Dataset:
  """Reads a prepared tfds data set through `tfds.data_source` (no TF).

  Never downloads: tfds's own download retries for minutes without network,
  so a missing data set fails at once with the offline options.
  """
  import tensorflow_datasets as tfds  # heavy import, only on this path

  try:
    sources = tfds.data_source(name, split=["train", "test"],
                               data_dir=data_dir, download=False)
  except Exception as error:
    raise DataError(offline_help(name, data_dir, error)) from error
  arrays = []
  for source in sources:
    records = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    arrays += [images, labels]
  return Dataset(*arrays, 10, f"tfds {name} in {data_dir or 'default dir'}")


def offline_help(name: str, data_dir: Optional[str], error=None) -> str:
  if name == "cifar10":
    files = ("the CIFAR-10 python batches (cifar-10-batches-py/data_batch_1..5,"
             " test_batch) in DIR")
  else:
    files = ("MNIST-format IDX files (train-images-idx3-ubyte[.gz],"
             " train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz],"
             " t10k-labels-idx1-ubyte[.gz]) in DIR")
  text = (f"no local copy of '{name}' was found"
          f"{' in ' + str(data_dir) if data_dir else ''} and this program does"
          " not download. Supply the data offline: pass --data-dir DIR with"
          f" {files}, or with a prepared tensorflow-datasets copy"
          f" (DIR/{name}/...). Fashion-MNIST: `apt-get install"
          f" dataset-fashion-mnist` puts it at {FASHION_MNIST_DEBIAN_DIR}.")
  if error is not None:
    text += f" (tfds said: {type(error).__name__}: {str(error)[:200]})"
  return text


def load(name: str, data_dir: Optional[str]) -> Dataset:
  """Loads `name` from `data_dir`, trying every offline format it knows.

  Args:
    name: "mnist", "fashion_mnist" or "cifar10".
    data_dir: a folder with IDX files / CIFAR batches / a tfds data dir; None
      looks in the default places (Debian's Fashion-MNIST, tfds's default).
  """
  if name not in ("mnist", "fashion_mnist", "cifar10"):
    raise DataError(f"unknown dataset {name!r}; choose mnist, fashion_mnist"
                    " or cifar10")
  candidates = [Path(data_dir)] if data_dir else []
  if data_dir is None and name == "fashion_mnist":
    candidates.append(Path(FASHION_MNIST_DEBIAN_DIR))
  if data_dir is not None and not Path(data_dir).is_dir():
    raise DataError(f"--data-dir {data_dir} is not a directory")
  for directory in candidates:
    if not directory.is_dir():
      continue
    if name == "cifar10":
      if (directory / "cifar-10-batches-py").is_dir() or (
          directory / "data_batch_1").exists():
        return read_cifar10_batches(directory)
    elif any(_find_idx(directory, s) for s in IDX_FILES.values()):
      return read_idx_dataset(directory, name)
  tfds_dir = data_dir or os.environ.get(
      "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
  if not (Path(tfds_dir) / name).is_dir():
    raise DataError(offline_help(name, data_dir))
  return read_tfds(name, tfds_dir)
