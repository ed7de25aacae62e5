"""Preemption: SIGTERM / SIGINT finish the current step, save a checkpoint and exit 128 + signal number.

`python -m train` calls `catch_stop_signals()` on its first line, before JAX, Hydra or any data is imported.
It used to install its handler only when the train loop began: a SIGTERM before that met the default action,
which ends the process at once, silently and without a checkpoint (exit 143 all the same), and the first run
after an install spends 25 s and more importing, building caches and compiling before its first step. Until
training starts there is nothing to save, and a signal ends the process at once with a line saying so; from
then on it is recorded and the train loop stops at its next step with a checkpoint.
"""

import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []  # stop signals since the handler was installed; the first one decides
_deferred = False  # training has started: the loop stops at its next step instead of the handler


def _say(line: str) -> None:
    os.write(2, (line + "\n").encode())  # not sys.stderr: its buffer may be mid-write in the interrupted frame


def _on_signal(signum: int, frame) -> None:
    _received.append(signum)
    if len(_received) > 1:
        _say(f"signal {signum} again: already stopping with a checkpoint (kill -9 ends the process at once, "
             f"losing the steps since the last checkpoint)")
    elif not _deferred:
        _say(f"stopped by signal {signum} before training started; nothing to save; re-run the same command to "
             f"resume")
        # Not an exception: raised here it can land in a callback that swallows it (JAX's gc callback does).
        os._exit(128 + signum)


def catch_stop_signals() -> None:
    """Install the stop-signal handler for the whole process (call first thing, before importing JAX)."""
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)


def defer_stop_signals() -> None:
    """From now on a stop signal is recorded and the train loop stops at its next step with a checkpoint."""
    global _deferred
    _deferred = True


class Preemption:
    """Catches the stop signals while a run trains; `reached(step)` says whether to save and stop now.

    On one host the signal handler records the signal. Across hosts JAX's preemption sync point (fed by the
    coordination service, whose own SIGTERM handler jax.distributed.initialize installed) makes every host
    stop at the same step. Installed for the whole process (`python -m train`), the handler stays after the
    loop, so that a second signal cannot cut the stop's checkpoint short; otherwise (a run started from
    Python) the previous handlers come back on exit.
    """

    def __init__(self):
        import jax

        self._synced = jax.process_count() > 1
        self._previous = {}

    def __enter__(self) -> "Preemption":
        global _deferred
        if signal.getsignal(signal.SIGTERM) is not _on_signal:
            _received.clear()
            # Multi-host: SIGTERM stays with the coordination service's handler (see `reached`).
            for sig in SIGNALS[1:] if self._synced else SIGNALS:
                self._previous[sig] = signal.signal(sig, _on_signal)
        _deferred = True
        return self

    def __exit__(self, *exc) -> None:
        global _deferred
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._previous:
            _deferred = False

    @property
    def signum(self) -> int | None:
        return _received[0] if _received else None

    def reached(self, step: int) -> bool:
        if self._synced:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                if not _received:
                    _received.append(signal.SIGTERM)
                return True
            return False
        return bool(_received)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; its code is 128 + the signal number."""


class NonFinite(RuntimeError):
    """The loss or gradient norm became NaN or infinite and trainer.nan_policy=stop."""
