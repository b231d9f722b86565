"""The experiments' data readers: real Fashion-MNIST, corrupt files, tfds."""

import gzip
import os
import pickle
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.common import data
from tests import helpers

FASHION = data.FASHION_MNIST_DEBIAN_DIR
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION),
                                   reason="apt-get install dataset-fashion-mnist")


@needs_fashion
def test_reads_real_fashion_mnist():
  ds = data.read_idx_dataset(FASHION, "fashion_mnist")
  assert ds.train_images.shape == (60000, 28, 28, 1)
  assert ds.test_images.shape == (10000, 28, 28, 1)
  assert ds.train_images.dtype == np.uint8
  assert set(np.unique(ds.train_labels)) == set(range(10))
  assert np.bincount(ds.test_labels).tolist() == [1000] * 10


@needs_fashion
@pytest.mark.parametrize("corruption, message", [
    ("truncate", "corrupt or truncated"),
    ("short_payload", "truncated or padded"),
    ("magic", "magic number"),
])
def test_corrupted_fashion_mnist_copies(tmp_path, corruption, message):
  for name in os.listdir(FASHION):
    shutil.copy(os.path.join(FASHION, name), tmp_path / name)
  target = tmp_path / "t10k-labels-idx1-ubyte.gz"
  raw = gzip.decompress(target.read_bytes())
  if corruption == "truncate":  # cut the gzip stream itself
    target.write_bytes(target.read_bytes()[:100])
  elif corruption == "short_payload":
    target.write_bytes(gzip.compress(raw[:-10]))
  else:
    target.write_bytes(gzip.compress((2051).to_bytes(4, "big") + raw[4:]))
  with pytest.raises(data.DataError, match=message) as info:
    data.read_idx_dataset(tmp_path)
  assert "t10k-labels" in str(info.value)


def test_idx_uncompressed_and_validation(tmp_path):
  helpers.write_mnist_like(tmp_path, n_train=20, n_test=10, compress=False)
  ds = data.read_idx_dataset(tmp_path)
  assert ds.train_images.shape == (20, 28, 28, 1)
  # A label file that disagrees with the image count.
  helpers.write_idx(tmp_path / "t10k-labels-idx1-ubyte",
                    np.zeros(9, np.uint8), 2049, compress=False)
  with pytest.raises(data.DataError, match="10 images but 9 labels"):
    data.read_idx_dataset(tmp_path)
  helpers.write_idx(tmp_path / "t10k-labels-idx1-ubyte",
                    np.full(10, 12, np.uint8), 2049, compress=False)
  with pytest.raises(data.DataError, match="label 12 is outside 0..9"):
    data.read_idx_dataset(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte")
  with pytest.raises(data.DataError, match="missing t10k-labels"):
    data.read_idx_dataset(tmp_path)


def test_cifar_batches_and_corruption(tmp_path):
  helpers.write_cifar_like(tmp_path, per_batch=8)
  ds = data.load("cifar10", str(tmp_path))
  assert ds.train_images.shape == (40, 32, 32, 3)
  assert ds.test_images.shape == (8, 32, 32, 3)
  folder = tmp_path / "cifar-10-batches-py"
  (folder / "data_batch_3").write_bytes(b"\x80\x04garbage")
  with pytest.raises(data.DataError, match="data_batch_3: cannot unpickle"):
    data.load("cifar10", str(tmp_path))
  with open(folder / "data_batch_3", "wb") as handle:
    pickle.dump({b"data": np.zeros((8, 100), np.uint8), b"labels": [0] * 8},
                handle)
  with pytest.raises(data.DataError, match=r"uint8 \(N, 3072\)"):
    data.load("cifar10", str(tmp_path))
  os.remove(folder / "test_batch")
  with pytest.raises(data.DataError, match="missing CIFAR-10"):
    data.load("cifar10", str(tmp_path))


def test_tfds_data_source_path_with_mock_data():
  with tfds.testing.mock_data(num_examples=12):
    ds = data.read_tfds("mnist", None)
  assert ds.train_images.shape == (12, 28, 28, 1)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.shape == (12,)
  assert ds.train_labels.max() <= 9


def test_offline_failure_is_fast_and_helpful(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  # Behaviour, not wall time: no connection is even attempted.
  attempts = []
  monkeypatch.setattr(socket.socket, "connect",
                      lambda self, *a: attempts.append(a))
  with pytest.raises(data.DataError) as info:
    data.load("mnist", None)
  assert attempts == []
  text = str(info.value)
  assert "--data-dir" in text and "does not download" in text
  assert "dataset-fashion-mnist" in text
  with pytest.raises(data.DataError, match="unknown dataset"):
    data.load("imagenet", None)
  with pytest.raises(data.DataError, match="not a directory"):
    data.load("mnist", str(tmp_path / "nowhere"))


def test_offline_failure_from_the_command_line(tmp_path):
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path), HOME=str(tmp_path))
  done = subprocess.run(
      [sys.executable, "-m", "experiments.mnist", "--layer", "deq",
       "--dataset", "mnist", "--no-progress"],
      capture_output=True, text=True, env=env, timeout=120)
  assert done.returncode == 1
  assert done.stderr.startswith("error: no local copy of 'mnist'")
  assert "--data-dir" in done.stderr and "does not download" in done.stderr
  assert "Traceback" not in done.stderr
  bad = subprocess.run(
      [sys.executable, "-m", "experiments.mnist", "--layer", "resnet"],
      capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "invalid choice: 'resnet'" in bad.stderr
  bad = subprocess.run(
      [sys.executable, "-m", "experiments.mnist", "--layer", "deq",
       "--epochs", "0"], capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "positive integer" in bad.stderr


def test_gzip_corrupted_past_the_header_is_one_clear_error(tmp_path):
  helpers.write_mnist_like(tmp_path, n_train=50, n_test=10)
  target = tmp_path / "train-labels-idx1-ubyte.gz"
  raw = bytearray(target.read_bytes())
  # Flip bytes inside the deflate stream, past the gzip header: zlib's
  # "invalid ... code" rather than a truncated file.
  for i in range(20, len(raw) - 8):
    raw[i] ^= 0x5A
  target.write_bytes(bytes(raw))
  with pytest.raises(data.DataError, match="corrupt") as info:
    data.read_idx_dataset(tmp_path)
  assert "train-labels-idx1-ubyte.gz" in str(info.value)
  assert "\n" not in str(info.value)


def test_empty_splits_are_refused(tmp_path):
  helpers.write_mnist_like(tmp_path / "idx", n_train=20, n_test=10)
  helpers.write_idx(tmp_path / "idx" / "t10k-images-idx3-ubyte.gz",
                    np.zeros((0, 28, 28), np.uint8), 2051)
  helpers.write_idx(tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz",
                    np.zeros((0,), np.uint8), 2049)
  with pytest.raises(data.DataError, match="test split has no examples"):
    data.load("mnist", str(tmp_path / "idx")).check_not_empty()
  helpers.write_cifar_like(tmp_path / "cifar", per_batch=4)
  with open(tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch",
            "wb") as handle:
    pickle.dump({b"data": np.zeros((0, 3072), np.uint8), b"labels": []},
                handle)
  with pytest.raises(data.DataError, match="test split has no examples"):
    data.load("cifar10", str(tmp_path / "cifar")).check_not_empty()


def test_string_cifar_labels_are_named(tmp_path):
  helpers.write_cifar_like(tmp_path, per_batch=4)
  with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
    pickle.dump({b"data": np.zeros((4, 3072), np.uint8),
                 b"labels": ["cat", "dog", "cat", "ship"]}, f)
  with pytest.raises(data.DataError,
                     match="data_batch_2: labels must be integers"):
    data.load("cifar10", str(tmp_path))
