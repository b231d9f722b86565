"""Solves and their derivatives under `jax.shard_map` (with its default
`check_vma=True`) and on a mesh with explicit sharding equal the
single-device run, for every solver and adjoint family."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def differences():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=2")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "tests", "sharded_solves.py")],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [
    "fixed_point_iteration/implicit", "anderson/implicit_gmres",
    "anderson/unrolled", "broyden/shine", "newton/phantom",
    "newton_gmres/neumann"])
def test_two_devices_equal_one(differences, case):
  # Values, reverse-mode gradients (a replicated weight's gradient summed
  # over the shards by JAX) and, for the implicit adjoint, forward-mode
  # tangents; float64.
  assert differences[case] < 1e-12, differences
