"""Orbax checkpoints after every epoch, and the record of the flags a run in
a workdir was started with (a resumed run must share them)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import jax
from flax import nnx

from experiments.common.config import Config
from experiments.common.steps import Experiment


class Checkpoints:
  """Orbax checkpoints of (model, optimizer, history) after each epoch."""

  def __init__(self, workdir: Optional[str]):
    self.manager = None
    if workdir:
      import orbax.checkpoint as ocp

      self._ocp = ocp
      path = Path(workdir).absolute() / "checkpoints"
      # Handlers named up front: orbax then reads a checkpoint's item
      # metadata without warning that it cannot restore the items.
      self.manager = ocp.CheckpointManager(
          path, options=ocp.CheckpointManagerOptions(max_to_keep=2,
                                                     create=True),
          item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                             history=ocp.JsonCheckpointHandler(),
                             warm_start=ocp.StandardCheckpointHandler()))

  def restore(self, model, optimizer, store=None, put=None):
    """Loads the latest checkpoint into the objects.

    Returns:
      (epoch, history, store): the warm-start store is restored when one is
      passed and the checkpoint holds one, and placed with `put(arrays,
      sharding)` (else it comes back unchanged).
    """
    if self.manager is None or self.manager.latest_step() is None:
      return 0, [], store
    step = self.manager.latest_step()
    state = nnx.state((model, optimizer))
    items = dict(
        state=self._ocp.args.StandardRestore(nnx.to_pure_dict(state)),
        history=self._ocp.args.JsonRestore())
    saved_items = set(self.manager.item_metadata(step).keys())
    if store is not None and "warm_start" in saved_items:
      items["warm_start"] = self._ocp.args.StandardRestore(
          {"z": store[0], "seen": store[1]})
    restored = self.manager.restore(step,
                                    args=self._ocp.args.Composite(**items))
    nnx.replace_by_pure_dict(state, restored["state"])
    nnx.update((model, optimizer), state)
    if "warm_start" in items:
      warm = restored["warm_start"]
      store = put((warm["z"], warm["seen"]),
                  jax.tree.leaves(store)[0].sharding)
    return step, list(restored["history"]), store

  def save(self, epoch: int, model, optimizer, history: list[dict],
           store=None) -> None:
    if self.manager is None:
      return
    state = nnx.to_pure_dict(nnx.state((model, optimizer)))
    items = dict(state=self._ocp.args.StandardSave(state),
                 history=self._ocp.args.JsonSave(history))
    if store is not None:
      items["warm_start"] = self._ocp.args.StandardSave(
          {"z": store[0], "seen": store[1]})
    self.manager.save(epoch, args=self._ocp.args.Composite(**items))
    self.manager.wait_until_finished()


# Config fields that do not change what a run computes: they may differ
# between a run and its resumption.
_RESUMABLE_FIELDS = ("model", "epochs", "data_dir", "metrics_out", "workdir",
                     "plots", "progress", "distributed", "coordinator_address",
                     "num_processes", "process_id")
_RUN_RECORD = "run.json"


def _run_identity(config: Config, experiment: Experiment) -> dict:
  """The settings a resumed run must share with the run saved in workdir,
  keyed by their command-line flag."""
  identity = {"experiment (--layer / --model)": experiment.name}
  for field in dataclasses.fields(config):
    if field.name in _RESUMABLE_FIELDS or field.name == "deq_options":
      continue
    value = getattr(config, field.name)
    if field.name == "fp_weight":
      value = list(config.fp_weights())
    identity["--" + field.name.replace("_", "-")] = value
  options = config.deq_options
  identity.update({
      "--jacobian-penalty": options.jacobian_penalty,
      "--fp-correction": list(options.record_steps),
      "--weight-norm / --spectral-norm": options.normalization,
      "--dropout": options.dropout,
      "--eval-max-steps": options.eval_max_steps,
  })
  return json.loads(json.dumps(identity))


def check_resume(config: Config, experiment: Experiment) -> None:
  """Refuses to resume a run in workdir that was started with other flags."""
  if not config.workdir:
    return
  record = Path(config.workdir) / _RUN_RECORD
  if not record.is_file():
    return
  try:
    saved = json.loads(record.read_text())
  except (OSError, ValueError) as error:
    raise ValueError(f"{record}: unreadable ({error}); it records the flags"
                     " of the run saved in --workdir") from error
  now = _run_identity(config, experiment)
  differ = [f"{key}: {saved.get(key)!r} there, {now.get(key)!r} now"
            for key in sorted(set(saved) | set(now))
            if saved.get(key) != now.get(key)]
  if differ:
    raise ValueError(
        f"--workdir {config.workdir} holds a run started with other settings;"
        " resuming would mix the two. Differences: " + "; ".join(differ)
        + ". Use the saved flags to resume it, or a new --workdir.")


def write_run_record(config: Config, experiment: Experiment) -> None:
  record = Path(config.workdir) / _RUN_RECORD
  if record.is_file():
    return
  temporary = record.with_suffix(".tmp")
  temporary.write_text(json.dumps(_run_identity(config, experiment),
                                  indent=1))
  os.replace(temporary, record)
