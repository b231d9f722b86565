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


def test_unrolled_floor_agrees_with_the_hand_written_gradient():
  # The script raises when jaxdeq's unrolled gradient differs from the
  # hand-written loops'.
  before = digest(RESULTS)
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.unrolled_floor", "--steps", "3",
       "--repeats", "1"], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr
  rows = [line for line in result.stdout.splitlines()
          if line.startswith("| ") and "ms" not in line]
  assert [r.split(" | ")[0] for r in rows] == [
      "| matmul (100x100 @ 100x100) in a loop",
      "| hand-written, per-step parameter gradient",
      "| hand-written, folded parameter gradient",
      "| jaxdeq UnrolledAdjoint (default budget)"]
  assert digest(RESULTS) == before


def test_interleaved_medians_alternate_the_callables_round_by_round():
  import pytest
  from benchmarks import _results

  calls = []
  fns = {name: (lambda name=name: calls.append(name)) for name in "ab"}
  medians = _results.interleaved_medians(fns, repeats=4, rounds=2,
                                         min_seconds=0.0)
  # Warm-ups, then round 0 in order and round 1 reversed, 2 calls each.
  assert "".join(calls) == "ab" + "aabb" + "bbaa"
  assert set(medians) == {"a", "b"}
  assert all(m >= 0 for m in medians.values())
  with pytest.raises(ValueError, match="rounds and repeats"):
    _results.interleaved_medians(fns, repeats=1, rounds=0)
