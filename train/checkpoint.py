"""Checkpoints: orbax CheckpointManager, async and atomic, newest N kept; resume from the latest good one.

A checkpoint holds the whole train state (parameters, model state such as batch statistics and RNG counters,
optimizer state, step) and a JSON record of the data position and the model config it was written for.
"""

import errno
import logging
import shutil
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes step N into N.orbax-checkpoint-tmp*, then renames it to N


class DiskFull(RuntimeError):
    """A checkpoint could not be written for lack of space; the previous complete one is intact."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether an error, or one it was raised from, is ENOSPC / EDQUOT (orbax's tensorstore says it in words)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(error) for s in ("No space left on device", "os_error_code='28'", "Disk quota exceeded")):
            return True
        error = error.__cause__ or error.__context__
    return False


class _DiskFullRecords(logging.Filter):
    """orbax logs a failed write with a traceback from each of its threads, and asyncio may report the same
    error again ("Future exception was never retrieved") when it collects one of orbax's futures; DiskFull says
    it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (is_disk_full(record.exc_info[1] if record.exc_info else None)
                    or "No space left on device" in record.getMessage())


for _logger in ("absl", "asyncio"):
    logging.getLogger(_logger).addFilter(_DiskFullRecords())


def _drop_closed_loop_callbacks(unraisable, previous=sys.unraisablehook) -> None:
    """After a failed write, tensorstore completes the other writes of that save into orbax's closed event loop;
    each prints a traceback (RuntimeError: Event loop is closed) that says nothing about the run."""
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        previous(unraisable)


sys.unraisablehook = _drop_closed_loop_callbacks


class Checkpoints:
    """Saves and restores train states under `<run_dir>/checkpoints`.

    `writer=True` for the one run that writes here: partial checkpoints a killed run left behind are removed
    (never by a reader such as trainer.init_from, which may look at a directory a live run writes to).
    """

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True, writer: bool = False):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True, cleanup_tmp_directories=writer),
        )
        self._writing: tuple[int, int] | None = None  # (step, bytes of its state) of the save in flight
        self._failed = False

    def save(self, step: int, state, meta: dict) -> None:
        """Start writing checkpoint `step`; it only counts once orbax has finalized it (atomic rename).

        A save that runs out of space (this one, or the previous asynchronous one, whose error surfaces here)
        raises DiskFull with one line; the previous complete checkpoint stays as it was.
        """
        self.wait()
        self._writing = (step, sum(x.nbytes for x in jax.tree.leaves(state)))
        self._guard(lambda: self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True))

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
        """Wait for the save in flight; DiskFull if it ran out of space."""
        self._guard(self.manager.wait_until_finished)
        self._writing = None

    def close(self) -> None:
        if self._failed:  # orbax has reported its error once; what it holds is only closed
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001
                pass
            return
        self.wait()
        self.manager.close()

    def _guard(self, write) -> None:
        try:
            write()
        except Exception as e:
            if not is_disk_full(e) or self._writing is None:
                raise
            self._failed = True
            raise self._disk_full(*self._writing) from None

    def _disk_full(self, step: int, state_bytes: int) -> DiskFull:
        """The one-line error, after removing the partial checkpoint (its space is free again)."""
        if jax.process_index() == 0:
            for partial in self.directory.glob(f"{step}{TMP_SUFFIX}*"):
                shutil.rmtree(partial, ignore_errors=True)
        self.manager.reload()
        complete = [s for s in self.steps() if s != step]
        if complete:
            previous = self.directory / str(complete[-1])
            needed = sum(f.stat().st_blocks * 512 for f in previous.rglob("*") if f.is_file())  # as the disk counts
            what = f"the size of checkpoint {complete[-1]}"
            after = f"checkpoint {complete[-1]} is intact; free space and re-run the same command to resume from it"
        else:
            needed, what, after = state_bytes, "the train state", "free space and re-run the same command"
        free = shutil.disk_usage(self.directory).free
        return DiskFull(f"checkpoint {step} could not be written: no space left in {self.directory} "
                        f"(needs about {needed:,} bytes, {what}; {free:,} bytes free); {after}")


def abstract_like(state):
    """ShapeDtypeStructs (with shardings) of a concrete or abstract state, for restoring onto it."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
