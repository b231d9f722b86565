"""End-to-end runs of the experiments on small data, on CPU."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments.cifar10 import train as cifar_train
from experiments.common import data, layers, outputs, training
from experiments.mnist import train as mnist_train
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
  return str(helpers.write_mnist_like(tmp_path_factory.mktemp("idx"),
                                      n_train=400, n_test=100))


def mnist_config(data_dir, tmp_path, **overrides):
  settings = dict(dataset="mnist", data_dir=data_dir, epochs=2,
                  batch_size=50, seed=0, progress=False,
                  metrics_out=str(tmp_path / "metrics.jsonl"))
  settings.update(overrides)
  return training.Config(**settings)


def read_metrics(path):
  with open(path) as handle:
    return [json.loads(line) for line in handle]


@pytest.mark.parametrize("layer", ["fixed_point", "newton",
                                   "newton_implicit", "newton_implicit_dense",
                                   "deq"])
def test_mnist_layer_trains(layer, mnist_dir, tmp_path):
  config = mnist_config(mnist_dir, tmp_path)
  history = mnist_train.train_and_evaluate(config, layer)
  rows = read_metrics(config.metrics_out)
  assert rows == history and [r["epoch"] for r in rows] == [1, 2]
  for row in rows:
    assert set(training.METRIC_KEYS) <= set(row)
    assert row["skipped_steps"] == 0 and row["forward_steps"] >= 1
  # The synthetic digits are learnable: a layer that trains fits them (every
  # layer reaches 0 test errors here; chance is 0.9).
  assert rows[1]["test_error"] < 0.05
  assert rows[1]["train_loss"] < rows[0]["train_loss"]
  assert rows[1]["test_loss"] < rows[0]["test_loss"]
  if layer in ("newton_implicit", "newton_implicit_dense", "deq"):
    assert rows[0]["backward_steps"] >= 1
  else:
    assert rows[0]["backward_steps"] == 0


# The multi-resolution model's own tests (tests/test_toolkit.py, its
# doctest) run by default; its end-to-end run repeats this loop: slow.
@pytest.mark.parametrize("model", [
    "deq_resnet", pytest.param("mdeq_small", marks=pytest.mark.slow)])
def test_cifar10_trains_and_plots(model, tmp_path):
  data_dir = helpers.write_cifar_like(tmp_path / "cifar", per_batch=4)
  config = training.Config(
      dataset="cifar10", data_dir=str(data_dir), epochs=2, batch_size=10,
      progress=False, metrics_out=str(tmp_path / "m.jsonl"),
      # Evaluation (and the plots' solves) capped at 5 of the 25 steps.
      deq_options=layers.DeqOptions(eval_max_steps=5),
      plots=str(tmp_path / "plots") if model == "deq_resnet" else None)
  history = cifar_train.train_and_evaluate(config, model)
  assert history[1]["train_loss"] < history[0]["train_loss"]
  assert 0 < history[-1]["spectral_radius"] <= history[-1][
      "spectral_radius_max"]
  assert read_metrics(config.metrics_out) == history
  if config.plots is None:  # one model's plots are enough
    return
  for name in ("residuals.png", "curves.png"):
    with open(tmp_path / "plots" / name, "rb") as handle:
      assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_mnist_with_every_stabiliser(mnist_dir, tmp_path):
  options = layers.DeqOptions(jacobian_penalty=1.0, record_steps=(2,),
                              normalization="weight", dropout=0.1,
                              eval_max_steps=30)
  history = mnist_train.train_and_evaluate(
      mnist_config(mnist_dir, tmp_path, deq_options=options, warm_start=True,
                   fp_weight=(0.5,)), "deq")
  assert history[1]["train_loss"] < history[0]["train_loss"]
  for row in history:
    assert row["skipped_steps"] == 0
    assert row["train_penalty"] > 0 and row["jacobian_penalty"] > 0
    assert 0 < row["spectral_radius"] <= row["spectral_radius_max"] < 1


def test_warm_start_saves_forward_steps_and_resumes(mnist_dir, tmp_path):
  cold = mnist_train.train_and_evaluate(
      mnist_config(mnist_dir, tmp_path / "cold"), "deq")
  workdir = str(tmp_path / "work")
  warm = mnist_train.train_and_evaluate(
      mnist_config(mnist_dir, tmp_path / "warm", epochs=1, workdir=workdir,
                   warm_start=True), "deq")
  warm = mnist_train.train_and_evaluate(
      mnist_config(mnist_dir, tmp_path / "warm", epochs=2, workdir=workdir,
                   warm_start=True), "deq")
  # Epoch 1 has no stored z* yet: the same run as the cold one. Epoch 2 runs
  # after a resume: it starts every example at its z* from epoch 1 only if
  # the checkpoint restored the store (an empty store repeats the cold run).
  assert warm[0]["forward_steps"] == cold[0]["forward_steps"]
  assert warm[1]["forward_steps"] < cold[1]["forward_steps"]


def test_stabiliser_flags_are_checked(mnist_dir, tmp_path):
  with pytest.raises(ValueError, match="dropout"):
    mnist_train.train_and_evaluate(
        mnist_config(mnist_dir, tmp_path,
                     deq_options=layers.DeqOptions(dropout=1.0)), "deq")
  with pytest.raises(ValueError, match="fp-weight"):
    mnist_train.train_and_evaluate(
        mnist_config(mnist_dir, tmp_path, fp_weight=(0.1, 0.2),
                     deq_options=layers.DeqOptions(record_steps=(2, 3, 4))),
        "deq")
  result = run_cli(["--layer", "deq", "--fp-correction", "5,3"])
  assert result.returncode == 2 and "increasing" in result.stderr
  result = run_cli(["--layer", "deq", "--weight-norm", "--spectral-norm"])
  assert result.returncode == 2 and "not allowed" in result.stderr
  with pytest.raises(ValueError, match="UnrolledAdjoint"):
    mnist_train.train_and_evaluate(
        mnist_config(mnist_dir, tmp_path,
                     deq_options=layers.DeqOptions(record_steps=(2,))),
        "fixed_point")


def test_resume_gives_the_uninterrupted_numbers(mnist_dir, tmp_path,
                                                caplog):
  straight = mnist_train.train_and_evaluate(
      mnist_config(mnist_dir, tmp_path / "a", epochs=3), "deq")
  workdir = str(tmp_path / "work")
  first = mnist_train.train_and_evaluate(
      mnist_config(mnist_dir, tmp_path / "b", epochs=2, workdir=workdir),
      "deq")
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    resumed = mnist_train.train_and_evaluate(
        mnist_config(mnist_dir, tmp_path / "b", epochs=3, workdir=workdir),
        "deq")
  # Restored without warnings a user cannot act on (orbax's "could not be
  # restored" for items it had no handler for).
  assert not [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING], caplog.text
  assert resumed[:2] == first
  for key in ("train_error", "train_loss", "test_error", "test_loss",
              "forward_steps", "backward_steps"):
    assert [r[key] for r in resumed] == [r[key] for r in straight], key


def test_nan_guard_skips_steps(mnist_dir, tmp_path, monkeypatch):
  # Batches whose first pixel is odd become NaN: their gradients are not
  # finite, so those steps must leave the parameters untouched.
  import jax.numpy as jnp
  from experiments.mnist import input_pipeline
  clean = input_pipeline.preprocess

  def poisoned(images):
    x = clean(images)
    return jnp.where(images.reshape(-1)[0] % 2 == 1, jnp.nan, x)

  monkeypatch.setattr(input_pipeline, "preprocess", poisoned)
  history = mnist_train.train_and_evaluate(
      mnist_config(mnist_dir, tmp_path, epochs=2), "deq")
  steps = 400 // 50
  for row in history:
    assert 1 <= row["skipped_steps"] < steps
  # Parameters stayed finite: clean test batches still give finite losses,
  # and training made progress on the clean batches.
  # (Poisoned test batches count as wrong: ~45% here; chance is 90%.)
  assert np.isfinite(history[1]["test_loss"])
  assert history[1]["test_error"] < 0.6


def test_skip_grad_norm_undoes_large_updates(mnist_dir, tmp_path):
  # Every gradient norm exceeds 1e-9: no update lands, so the two epochs see
  # the same (initial) model and every step is counted as skipped.
  history = mnist_train.train_and_evaluate(
      mnist_config(mnist_dir, tmp_path, skip_grad_norm=1e-9), "fixed_point")
  assert [row["skipped_steps"] for row in history] == [400 // 50] * 2
  assert history[0]["test_loss"] == history[1]["test_loss"]
  # A generous threshold lets every step through.
  history = mnist_train.train_and_evaluate(
      mnist_config(mnist_dir, tmp_path, epochs=1, skip_grad_norm=1e6),
      "fixed_point")
  assert history[0]["skipped_steps"] == 0


def test_skip_grad_norm_must_be_positive(mnist_dir, tmp_path):
  with pytest.raises(ValueError, match="skip-grad-norm"):
    mnist_train.train_and_evaluate(
        mnist_config(mnist_dir, tmp_path, skip_grad_norm=0.0), "fixed_point")


def run_cli(args, env=None, **kwargs):
  return subprocess.run([sys.executable, "-m", "experiments.mnist", *args],
                        cwd=REPO, capture_output=True, text=True,
                        env=env, **kwargs)


def free_port():
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def test_two_processes_match_one_process(mnist_dir, tmp_path):
  """`--distributed` on localhost: 2 processes of 2 CPU devices each (JAX's
  gloo collectives) train the same global batch as 1 process on 1 device."""
  args = ["--layer", "deq", "--data-dir", mnist_dir, "--epochs", "1",
          "--batch-size", "100", "--no-progress"]
  env = dict(os.environ)
  # The suite's own flags (conftest.py) stay; only the device count differs.
  flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                   if "host_platform_device_count" not in f)
  env["XLA_FLAGS"] = flags
  one = subprocess.Popen(
      [sys.executable, "-m", "experiments.mnist", *args, "--metrics-out",
       str(tmp_path / "one.jsonl")], cwd=REPO, env=env, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2"
  cluster = ["--distributed", "--num-processes", "2",
             "--coordinator-address", f"localhost:{free_port()}",
             "--metrics-out", str(tmp_path / "two.jsonl"),
             "--workdir", str(tmp_path / "two")]
  processes = [subprocess.Popen(
      [sys.executable, "-m", "experiments.mnist", *args, *cluster,
       "--process-id", str(i)], cwd=REPO, env=env, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in [one, *processes]]
  for process, (_, stderr) in zip([one, *processes], outputs):
    assert process.returncode == 0, stderr
  assert "4 device(s) (cpu) in 2 processes" in outputs[1][0]
  assert "train_error" not in outputs[2][0]  # only the first one prints
  a, b = read_metrics(tmp_path / "one.jsonl"), read_metrics(
      tmp_path / "two.jsonl")
  for key in ("train_loss", "test_loss", "train_error", "test_error",
              "forward_steps", "backward_steps"):
    np.testing.assert_allclose(b[0][key], a[0][key], rtol=1e-4, atol=1e-4,
                               err_msg=key)
  # Both processes wrote their shards into one checkpoint.
  assert (tmp_path / "two" / "checkpoints" / "1").is_dir()


@pytest.mark.slow
def test_kill_minus_nine_then_resume(mnist_dir, tmp_path):
  args = ["--layer", "deq", "--data-dir", mnist_dir, "--epochs", "4",
          "--batch-size", "50", "--no-progress"]
  straight = run_cli(args + ["--metrics-out", str(tmp_path / "s.jsonl")],
                     timeout=600)
  assert straight.returncode == 0, straight.stderr
  workdir = tmp_path / "work"
  metrics = tmp_path / "k.jsonl"
  process = subprocess.Popen(
      [sys.executable, "-m", "experiments.mnist", *args, "--workdir",
       str(workdir), "--metrics-out", str(metrics)], cwd=REPO,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline:  # kill once epoch 2 is checkpointed
    if metrics.exists() and len(read_metrics(metrics)) >= 2:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  resumed = run_cli(args + ["--workdir", str(workdir), "--metrics-out",
                            str(metrics)], timeout=600)
  assert resumed.returncode == 0, resumed.stderr
  assert "resuming after epoch" in resumed.stdout
  for a, b in zip(read_metrics(metrics), read_metrics(tmp_path / "s.jsonl"),
                  strict=True):
    for key in ("train_error", "train_loss", "test_error", "test_loss"):
      assert a[key] == b[key], key


@pytest.mark.parametrize("layer, flag, expected", [
    ("newton", [], 100.0),
    ("newton_dense", [], 100.0),
    ("newton", ["--skip-grad-norm", "5"], 5.0),
    ("fixed_point", [], None),
    ("newton_implicit", [], 100.0),
    ("newton_implicit_dense", [], None),
])
def test_mnist_cli_skip_grad_norm_default(layer, flag, expected):
  from experiments.mnist import main as mnist_main
  config = mnist_main.parse_config(["--layer", layer, *flag])
  assert config.skip_grad_norm == expected


def test_config_module_then_flags(tmp_path):
  from experiments.cifar10 import main as cifar_main
  from experiments.mnist import main as mnist_main
  default = mnist_main.parse_config([])
  assert (default.model, default.dataset, default.epochs,
          default.batch_size) == ("deq", "fashion_mnist", 10, 100)
  assert mnist_main.parse_config(["--layer", "newton"]).epochs == 8
  config = mnist_main.parse_config(
      ["--batch-size", "40", "--dropout", "0.1", "--spectral-norm",
       "--no-progress"])
  assert (config.batch_size, config.progress) == (40, False)
  assert config.deq_options == layers.DeqOptions(dropout=0.1,
                                                 normalization="spectral")
  path = tmp_path / "mine.py"
  path.write_text(
      "import dataclasses\n"
      "from experiments.mnist.configs import default\n"
      "def get_config():\n"
      "  return dataclasses.replace(default.get_config(), model='newton',"
      " batch_size=7, epochs=3, seed=4)\n")
  config = mnist_main.parse_config(["--config", str(path), "--epochs", "5"])
  # The file's settings, except what a flag overrides.
  assert (config.model, config.batch_size, config.epochs, config.seed) == (
      "newton", 7, 5, 4)
  assert config.skip_grad_norm == 100.0  # the layer's default still applies
  shipped = cifar_main.parse_config(
      ["--config", os.path.join(REPO, "experiments", "cifar10", "configs",
                                "fashion_mnist.py")])
  assert (shipped.dataset, shipped.limit_train, shipped.epochs) == (
      "fashion_mnist", 4000, 3)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("x = 1\n", "defines no get_config"),
    ("def get_config():\n  return {}\n", "not a training.Config"),
    ("import nothing_here\n", "failed to load"),
])
def test_bad_config_files_are_named(content, message, tmp_path, capsys):
  from experiments.mnist import main as mnist_main
  path = tmp_path / "config.py"
  if content is not None:
    path.write_text(content)
  with pytest.raises(SystemExit):
    mnist_main.parse_config(["--config", str(path)])
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (dict(num_processes=2), "only apply with --distributed"),
    (dict(distributed=True, num_processes=2, process_id=2), "--process-id"),
])
def test_cluster_settings_are_checked(overrides, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    mnist_config("unused", tmp_path, **overrides).validate()


def test_resume_refuses_other_flags_and_says_when_complete(
    mnist_dir, tmp_path, capsys):
  workdir = str(tmp_path / "work")
  metrics = tmp_path / "metrics.jsonl"
  first = mnist_train.train_and_evaluate(
      mnist_config(mnist_dir, tmp_path, epochs=1, batch_size=150,
                   workdir=workdir), "deq")
  out = capsys.readouterr().out
  assert "100 are left out of each epoch" in out  # 400 = 2 x 150 + 100
  saved = metrics.read_bytes()
  with pytest.raises(ValueError) as info:
    mnist_train.train_and_evaluate(
        mnist_config(mnist_dir, tmp_path, epochs=2, batch_size=40,
                     workdir=workdir), "fixed_point")
  message = str(info.value)
  assert "--batch-size: 150 there, 40 now" in message
  assert "mnist/deq" in message and "mnist/fixed_point" in message
  assert metrics.read_bytes() == saved  # nothing touched
  again = mnist_train.train_and_evaluate(
      mnist_config(mnist_dir, tmp_path, epochs=1, batch_size=150,
                   workdir=workdir), "deq")
  assert again == first
  assert "already complete" in capsys.readouterr().out
  # The command line says it in one line, exit status 1.
  result = run_cli(["--layer", "fixed_point", "--data-dir", mnist_dir,
                    "--workdir", workdir, "--epochs", "2", "--no-progress"])
  assert result.returncode == 1
  assert result.stderr.startswith("error: --workdir")
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag, make, message", [
    ("workdir", lambda p: p.write_text("x") and p, "is a file"),
    ("workdir", lambda p: p.write_text("x") and p / "sub", "is a file"),
    ("metrics_out", lambda p: p.mkdir() or p, "is a directory"),
    ("plots", lambda p: p.write_text("x") and p, "is a file"),
])
def test_bad_output_paths_fail_before_training(mnist_dir, tmp_path, flag,
                                               make, message):
  path = make(tmp_path / "target")
  before = sorted(os.listdir(tmp_path))
  overrides = {"metrics_out": None, flag: str(path)}
  with pytest.raises(ValueError, match=message):
    mnist_train.train_and_evaluate(
        mnist_config(mnist_dir, tmp_path, **overrides), "deq")
  assert sorted(os.listdir(tmp_path)) == before  # nothing left behind


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_an_output_directory_that_cannot_be_created_fails_first(
    mnist_dir, tmp_path, monkeypatch):
  loaded = []
  monkeypatch.setattr(data, "load", lambda *a: loaded.append(a))
  started = time.perf_counter()
  with pytest.raises(ValueError, match="--plots /proc/jaxdeq/x: cannot"
                     " write there"):
    mnist_train.train_and_evaluate(
        mnist_config(mnist_dir, tmp_path, plots="/proc/jaxdeq/x"), "deq")
  assert not loaded and time.perf_counter() - started < 5
  assert not os.listdir(tmp_path)  # nothing written
  # A new directory passes the check and is not left behind by it.
  config = mnist_config(mnist_dir, tmp_path, plots=str(tmp_path / "a/b"))
  outputs.check_paths(config)
  assert not os.listdir(tmp_path)


def test_metrics_are_written_through_a_symbolic_link(tmp_path):
  target = tmp_path / "real" / "metrics.jsonl"
  target.parent.mkdir()
  target.write_text("stale\n")
  link = tmp_path / "link.jsonl"
  link.symlink_to(target)
  outputs.check_paths(mnist_config("unused", tmp_path,
                                   metrics_out=str(link)))
  outputs.write_metrics(str(link), [{"epoch": 1}, {"epoch": 2}])
  assert link.is_symlink() and os.readlink(link) == str(target)
  assert read_metrics(target) == [{"epoch": 1}, {"epoch": 2}]
  assert sorted(os.listdir(target.parent)) == ["metrics.jsonl"]


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev")
def test_metrics_out_refuses_a_device_node(tmp_path):
  with pytest.raises(ValueError, match="/dev/null is not a regular file"):
    outputs.check_paths(mnist_config("unused", tmp_path,
                                     metrics_out="/dev/null"))


@pytest.mark.parametrize("argv, message", [
    (["--config", "{tmp}/cfg.yaml"], "a config is a Python file (.py)"),
    (["--fp-weight", "1,2"], "--fp-weight weighs the fixed-point"
     " correction's losses: it needs --fp-correction"),
    (["--workdir", ""], "--workdir is empty; leave the flag out instead"),
    (["--metrics-out", " "], "--metrics-out is empty"),
])
def test_command_line_refusals_are_one_line(argv, message, tmp_path,
                                            capsys):
  from experiments.mnist import main as mnist_main
  (tmp_path / "cfg.yaml").write_text("epochs: 3\n")
  argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
  with pytest.raises(SystemExit) as exit_info:
    mnist_main.main(["--data-dir", str(tmp_path), *argv])
  # argparse's usage error (status 2), or main's "error: ..." (status 1).
  assert exit_info.value.code in (2, f"error: {message}") or message in str(
      exit_info.value.code)
  shown = capsys.readouterr().err + str(exit_info.value.code)
  assert message in shown and "Traceback" not in shown


def _interrupt_after_epochs(args, metrics, epochs):
  """Starts the MNIST command line, sends SIGINT once `epochs` epochs are in
  `metrics`; returns the finished process's (returncode, stderr)."""
  process = subprocess.Popen(
      [sys.executable, "-m", "experiments.mnist", *args], cwd=REPO,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if metrics.exists() and len(read_metrics(metrics)) >= epochs:
      break
    time.sleep(0.02)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  return process.returncode, stderr


def test_ctrl_c_is_one_line_and_leaves_a_resumable_workdir(mnist_dir,
                                                           tmp_path):
  workdir, metrics = tmp_path / "work", tmp_path / "m.jsonl"
  args = ["--layer", "fixed_point", "--data-dir", mnist_dir, "--epochs",
          "200", "--batch-size", "100", "--no-progress", "--workdir",
          str(workdir), "--metrics-out", str(metrics)]
  code, stderr = _interrupt_after_epochs(args, metrics, 1)
  assert code == 130, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in stderr, stderr
  saved = len(read_metrics(metrics))
  assert lines[0] == (
      f"interrupted: epochs 1-{saved} are saved in {workdir}; resume with:"
      f" python -m experiments.mnist {' '.join(args)}")
  assert str(saved) in os.listdir(workdir / "checkpoints")


@pytest.mark.slow
def test_ctrl_c_then_resume_gives_the_uninterrupted_numbers(mnist_dir,
                                                            tmp_path):
  args = ["--layer", "deq", "--data-dir", mnist_dir, "--epochs", "4",
          "--batch-size", "50", "--no-progress"]
  straight = run_cli(args + ["--metrics-out", str(tmp_path / "s.jsonl")],
                     timeout=600)
  assert straight.returncode == 0, straight.stderr
  resume = args + ["--workdir", str(tmp_path / "work"), "--metrics-out",
                   str(tmp_path / "k.jsonl")]
  code, stderr = _interrupt_after_epochs(resume, tmp_path / "k.jsonl", 2)
  assert code == 130 and "resume with" in stderr, stderr
  resumed = run_cli(resume, timeout=600)
  assert resumed.returncode == 0, resumed.stderr
  assert "resuming after epoch" in resumed.stdout
  for a, b in zip(read_metrics(tmp_path / "k.jsonl"),
                  read_metrics(tmp_path / "s.jsonl"), strict=True):
    for key in ("train_error", "train_loss", "test_error", "test_loss"):
      assert a[key] == b[key], key


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DEBIAN_DIR),
                    reason="apt-get install dataset-fashion-mnist")
def test_conv_deq_learns_real_fashion_mnist(tmp_path):
  # The tutorial's convolutional DEQ on real images, tiny: 1,000 training
  # examples, 2 epochs (~3 minutes on 2 CPU cores). Chance is 90% error.
  config = training.Config(
      dataset="fashion_mnist", epochs=2, batch_size=100, progress=False,
      limit_train=1000, limit_test=500,
      metrics_out=str(tmp_path / "m.jsonl"))
  history = cifar_train.train_and_evaluate(config, "deq_resnet")
  assert history[1]["train_loss"] < history[0]["train_loss"]
  assert history[1]["test_error"] < 0.5
  assert history[1]["skipped_steps"] == 0


def test_mnist_fixed_point_compacts_unless_a_stabiliser_needs_the_batch():
  from flax import nnx

  from experiments.mnist import models
  assert models.make_deq("fixed_point", nnx.Rngs(0)).compact
  assert not models.make_deq("newton_implicit", nnx.Rngs(0)).compact
  for options in (layers.DeqOptions(dropout=0.1),
                  layers.DeqOptions(record_steps=(2,))):
    if options.record_steps:  # fp-correction needs another adjoint anyway
      with pytest.raises(ValueError, match="UnrolledAdjoint"):
        models.make_deq("fixed_point", nnx.Rngs(0), options)
    else:
      assert not models.make_deq("fixed_point", nnx.Rngs(0), options).compact


def test_residual_plot_shows_gmres_backward_at_its_iteration_count(tmp_path):
  from flax import nnx
  from experiments.common import plots
  experiment = mnist_train.experiment("newton_implicit")
  model = experiment.make_model(nnx.Rngs(0), layers.DeqOptions())
  images = np.random.default_rng(0).integers(0, 255, (8, 28, 28, 1),
                                             dtype=np.uint8)
  forward, backward, steps = plots.residual_traces(
      experiment, model, experiment.preprocess(images))
  assert forward.shape[1] == 8 and len(forward) >= 2
  # GMRES reports its residual once, after all its iterations.
  assert backward.shape == (1, 8) and steps > 1
  paths = plots.write_all(str(tmp_path), experiment, model, [],
                          experiment.preprocess(images))
  assert [os.path.basename(p) for p in paths] == ["residuals.png"]
