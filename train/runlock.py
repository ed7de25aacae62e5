"""One run per run directory: each process of a run holds an OS lock on `run.lock.<process index>` in it.

The lock is `fcntl.flock` on a file kept open for the run's life, so the kernel releases it when its holder
dies, `kill -9` included, and a re-run after a crash resumes as before. Each process of a multi-host job
locks its own index: the processes of one job share the directory, while a second job's process k still
meets the first job's process k (one lock for process 0 alone would let a second job's other processes in).
"""

import datetime
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

_held: dict[Path, int | None] = {}  # lock file -> open descriptor, for the locks this process holds


class RunDirInUse(ValueError):
    """The run directory is held by another live run."""


def lock_path(run_dir: str | Path, process_index: int) -> Path:
    return Path(run_dir).absolute() / f"run.lock.{process_index}"


def acquire(run_dir: str | Path, process_index: int) -> Path | None:
    """Lock `run_dir` for this process; RunDirInUse names the holder.

    Returns the lock to `release`, or None where this process held it already (its first taker releases it).
    """
    path = lock_path(run_dir, process_index)
    if path in _held:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OSError(f"output directory {run_dir} is not writable ({e.strerror}); "
                      f"choose another with hydra.run.dir=PATH") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunDirInUse(f"{run_dir} is in use by another run ({holder}); "
                          f"wait for it or pick another hydra.run.dir") from None
    except OSError as e:  # a filesystem without flock (some FUSE mounts): run, but say what is not guarded
        os.close(fd)
        print(f"warning: cannot lock {path} ({e.strerror}); a second run in {run_dir} would not be stopped",
              file=sys.stderr)
        _held[path] = None  # said once for this process
        return path
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {since}\n".encode(), 0)
    _held[path] = fd
    return path


def release(path: Path | None) -> None:
    """Give up a lock `acquire` took (closing the file releases it); the file stays for the next run."""
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def _holder(fd: int) -> str:
    """The holder's line from the lock file; it writes it right after locking, so wait a moment for it."""
    for _ in range(20):
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "pid unknown"


def _close_in_child() -> None:
    # A forked child shares the open lock files; closing its copies (never LOCK_UN, which would release the
    # parent's lock) keeps a child that outlives a killed run from holding the directory.
    for fd in _held.values():
        if fd is not None:
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def process_index_before_start(cfg: DictConfig) -> int | None:
    """This process's index in its job, read the way `train.mesh.initialize_distributed` will, before JAX starts.

    None on a TPU pod, where JAX asks the VM's metadata server: there the lock waits for `jax.process_index()`.
    """
    if cfg.distributed.coordinator_address is not None:
        return cfg.distributed.process_id
    if "SLURM_JOB_ID" in os.environ:
        return int(os.environ.get("SLURM_PROCID", 0))
    if "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
        return None
    return 0


class LockRunDir(Callback):
    """Hydra callback: lock the run directory before Hydra writes `.hydra/` and the log file into it."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        index = process_index_before_start(config)
        if index is None:
            return  # locked in train/__main__ once JAX knows the index; Hydra's files are written before that
        HydraConfig.instance().set_config(config)  # hydra.run.dir's ${hydra:...} read it; Hydra sets it next anyway
        try:
            acquire(config.hydra.run.dir, index)
        except (ValueError, OSError) as e:
            raise SystemExit(f"error: {e}") from None
