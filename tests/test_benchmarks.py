"""Benchmark scripts run, print their table and leave tracked files alone
unless asked (`--record`)."""

import hashlib
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "RESULTS.md")


def digest(path):
  with open(path, "rb") as handle:
    return hashlib.sha256(handle.read()).hexdigest()


def test_unrolled_benchmark_prints_both_modes_and_records_nothing():
  before = digest(RESULTS)
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.unrolled", "--max-steps", "4",
       "--repeats", "1"], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr
  table = [line for line in result.stdout.splitlines()
           if line.startswith("| float")]
  assert len(table) == 4
  # A 4-step float32 trajectory fits the default budget: the tape; with
  # memory_budget=0: checkpointed.
  assert "(tape)" in table[0] and "(checkpointed)" in table[1]
  assert digest(RESULTS) == before
  assert "appended" not in result.stdout
