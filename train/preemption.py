"""Preemption: SIGTERM / SIGINT finish the current step, save a checkpoint and exit 128 + signal number."""

import signal

import jax
from jax.experimental import multihost_utils


class Preemption:
    """Catches the stop signals while a run trains; `reached(step)` says whether to save and stop now.

    On one host the signal handler sets a flag. Across hosts JAX's preemption sync point (fed by the
    coordination service, which also listens for SIGTERM on TPU VMs and Slurm) makes every host stop at
    the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}
        self._synced = jax.process_count() > 1

    def __enter__(self) -> "Preemption":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def reached(self, step: int) -> bool:
        if self._synced:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; its code is 128 + the signal number."""


class NonFinite(RuntimeError):
    """The loss or gradient norm became NaN or infinite and trainer.nan_policy=stop."""
