"""XLA op profiles of a jitted function (jax.profiler trace, summed by op)."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax

_MOVEMENT = ("copy", "dynamic-slice", "dynamic-update-slice", "slice",
             "transpose", "broadcast", "concatenate", "bitcast", "pad",
             "DevicePut")


def _matmul_ops(hlo_text: str) -> set[str]:
  """Names of the ops that are dots or convolutions, or fusions whose
  computation has one."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and "=" not in line.split("{")[0]:
      current = header.group(1)
      computations[current] = []
    elif current is not None:
      computations[current].append(line)
  has_dot = {name for name, body in computations.items()
             if any(re.search(r"\s(dot|convolution)\(", l) for l in body)}
  ops = set()
  for body in computations.values():
    for line in body:
      m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
      if not m:
        continue
      called = re.search(r"calls=%?([\w.\-]+)", line)
      if re.search(r"\s(dot|convolution)\(", line) or (
          called and called.group(1) in has_dot):
        ops.add(m.group(1))
  return ops


def op_profile(run, hlo_text: str, module_prefix: str, steps: int,
               top: int = 12) -> dict:
  """Traces `run()` (which makes `steps` calls of the jitted function whose
  compiled HLO is `hlo_text` and module name starts with `module_prefix`)
  and sums its XLA ops, per call.

  Returns:
    dict(profiled_ms, categories={matmul/conv, other fusions, data
    movement: ms}, uncovered (ms no op covers), loops [(outermost loop,
    inclusive ms)], top [(op, ms, calls, us/call, is matmul/conv)]).
  """
  matmuls = _matmul_ops(hlo_text)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      started = time.perf_counter()
      jax.block_until_ready(run())
      profiled_ms = (time.perf_counter() - started) / steps * 1e3
    trace_file = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    events = json.load(gzip.open(trace_file[0]))["traceEvents"]
  ops = sorted((e for e in events if e.get("ph") == "X"
                and e.get("args", {}).get("hlo_module", "").startswith(
                    module_prefix)), key=lambda e: (e["tid"], e["ts"]))
  # An op that encloses another (while, conditional, call) is a container:
  # its time is its children's plus loop control.
  containers = set()
  for a, b in zip(ops, ops[1:]):
    if a["tid"] == b["tid"] and b["ts"] + b["dur"] <= a["ts"] + a["dur"]:
      containers.add(id(a))
  enclosing_end = {}
  top_loops = collections.Counter()
  for e in ops:
    end = enclosing_end.get(e["tid"], -1.0)
    if e["ts"] >= end and id(e) in containers:
      top_loops[e["name"]] += e["dur"]
      enclosing_end[e["tid"]] = e["ts"] + e["dur"]
  leaf = collections.Counter()
  calls = collections.Counter()
  for e in ops:
    if id(e) not in containers:
      leaf[e["name"]] += e["dur"]
      calls[e["name"]] += 1
  category = collections.Counter()
  for name, us in leaf.items():
    if name in matmuls:
      category["matmul/conv"] += us
    elif name.startswith(_MOVEMENT) or any(
        f"_{m}" in name for m in _MOVEMENT[:5]):
      category["data movement"] += us
    else:
      category["other fusions"] += us
  per_step = lambda us: us / steps / 1e3
  covered = sum(leaf.values())
  return dict(
      categories={k: per_step(v) for k, v in category.items()},
      profiled_ms=profiled_ms,
      uncovered=profiled_ms - per_step(covered),
      loops=[(n, per_step(us)) for n, us in top_loops.most_common()],
      top=[(n, per_step(us), calls[n] / steps, us / calls[n],
            n in matmuls) for n, us in leaf.most_common(top)])


