"""Appends a dated, self-describing section to benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from importlib import metadata

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def _version(name: str) -> str:
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return "-"


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as handle:
      for line in handle:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  import jax

  devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
  packages = ", ".join(f"{n} {_version(n)}" for n in
                       ("jax", "jaxlib", "flax", "optax", "torch", "torchdeq",
                        "jaxopt", "optimistix"))
  return (f"{cpu}; {os.cpu_count()} cores; JAX devices: {devices};"
          f" Python {sys.version.split()[0]}; {packages}")


def median_seconds(fn, *args, repeats: int) -> float:
  """Median wall time of `fn(*args)` over `repeats` calls after a warm-up."""
  import jax

  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - started)
  return statistics.median(times)


def interleaved_medians(fns: dict, *, repeats: int, rounds: int = 5,
                        min_seconds: float = 1.0,
                        max_calls: int = 200) -> dict:
  """Median seconds per call of each of `fns`, timed in alternating rounds.

  Each callable (which must return when its work is done) is called once to
  warm up. Then, in each of `rounds` rounds, every callable is timed for at
  least ceil(repeats / rounds) calls and min_seconds / rounds seconds (at
  most max_calls / rounds calls), in the given order in even rounds and the
  reverse order in odd ones. On a shared machine whose speed drifts by tens
  of percent within minutes, the libraries compared then see the same
  drift, which timing one after the other does not give.

  Returns:
    {name: median of that callable's timed calls}.
  """
  if rounds < 1 or repeats < 1:
    raise ValueError(f"rounds and repeats must be >= 1, got {rounds},"
                     f" {repeats}")
  for fn in fns.values():
    fn()
  calls = -(-repeats // rounds)
  cap = max(calls, max_calls // rounds)
  times = {name: [] for name in fns}
  names = list(fns)
  for round_index in range(rounds):
    for name in (names if round_index % 2 == 0 else names[::-1]):
      spent, count = 0.0, 0
      while count < calls or (spent < min_seconds / rounds and count < cap):
        started = time.perf_counter()
        fns[name]()
        elapsed = time.perf_counter() - started
        times[name].append(elapsed)
        spent, count = spent + elapsed, count + 1
  return {name: statistics.median(t) for name, t in times.items()}


def against_target(speedup: float, target) -> str:
  """A table cell saying whether `speedup` meets `target` (None: no target),
  and by how much it falls short."""
  if target is None:
    return "-"
  if speedup >= target:
    return f"met (>= {target:g}x)"
  return f"missed: {target:g}x needs {target / speedup:.2f}x more"


def markdown_table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def append(title: str, command: str, body: str) -> None:
  """Prints `body` and appends it to RESULTS.md with machine and command."""
  print(body)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M UTC")
  section = (f"\n## {title} ({stamp})\n\nMachine: {machine()}\n\n"
             f"Command: `{command}`\n\n{body}\n")
  with open(RESULTS, "a") as handle:
    handle.write(section)
  print(f"appended to {RESULTS}")


def command(module: str, argv=None) -> str:
  """The command line that ran `benchmarks.<module>`, for a section header."""
  args = sys.argv[1:] if argv is None else argv
  return " ".join(["python -m benchmarks." + module, *args])


def report(body: str, *, record: bool, title: str, module: str,
           argv=None) -> None:
  """Prints `body`; with `record`, appends it to RESULTS.md as `title`."""
  if record:
    append(title, command(module, argv), body)
  else:
    print(body)
