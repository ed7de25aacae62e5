"""Checkpoints: orbax CheckpointManager, async and atomic, newest N kept; resume from the latest good one.

A checkpoint holds the whole train state (parameters, model state such as batch statistics and RNG counters,
optimizer state, step) and a JSON record of the data position and the model config it was written for.
"""

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpoints:
    """Saves and restores train states under `<run_dir>/checkpoints`."""

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
        )

    def save(self, step: int, state, meta: dict) -> None:
        """Start writing checkpoint `step`; it only counts once orbax has finalized it (atomic rename)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Checkpoint `step` restored onto the shardings of `abstract_state` (any mesh)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def set_aside(self, step: int) -> Path:
        """Move an unreadable checkpoint out of the way (never delete it), so its step can be written again."""
        target = self.directory.parent / "checkpoints_unreadable" / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state):
    """ShapeDtypeStructs (with shardings) of a concrete or abstract state, for restoring onto it."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
