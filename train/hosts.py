"""A lost process in a multi-host job ends every other one within a bound, with one line naming it.

Without this, a process blocked in a collective with a dead one waits until JAX's coordination service misses
the dead one's heartbeats, and then aborts every process with a many-line fatal log. Here each process beats in
the service's key-value store from a thread and watches the others' beats: when one stays silent for
`heartbeat_timeout_s`, every other process prints `error: lost process K of N (...)` and exits 1. JAX's own
heartbeat timeout is set to twice ours, as the backstop. (If process 0, which hosts the service, is the one lost,
JAX aborts the others at once with its own message.)
"""

import atexit
import os
import sys
import threading
import time

BEATS = "archlab/heartbeat/"
EXITING = "archlab/exiting/"
DONE = "done"  # a process that exits normally (or with its own error) says so, and is not reported lost

_watchdog: "Watchdog | None" = None


class Watchdog:
    """Beats for this process and watches the others' beats, in one daemon thread."""

    def __init__(self, client, process_id: int, num_processes: int, timeout_s: float):
        self.client, self.me, self.n, self.timeout = client, process_id, num_processes, timeout_s
        self.interval = min(max(timeout_s / 10, 0.2), 5.0)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="archlab-heartbeat", daemon=True)

    def _run(self) -> None:
        beat, seen = 0, {}
        changed = {p: time.monotonic() for p in range(self.n) if p != self.me}
        while not self.stopped.wait(self.interval):
            beat += 1
            try:
                self.client.key_value_set(f"{BEATS}{self.me}", str(beat), allow_overwrite=True)
                beats = {key.rsplit("/", 1)[-1]: value for key, value in self.client.key_value_dir_get(BEATS)}
            except Exception as e:  # noqa: BLE001  (the service is gone: it lived in process 0)
                if not self.stopped.is_set():
                    self._lose([0], f"the coordinator: {str(e).strip().splitlines()[0][:100] if str(e) else e}")
                return
            now = time.monotonic()
            for p in list(changed):
                value = beats.get(str(p))
                if value == DONE:
                    del changed[p]
                elif value != seen.get(p):
                    seen[p], changed[p] = value, now
            if any(now - t > self.timeout for t in changed.values()):
                # Beats come every interval: one silent for most of the timeout is lost too (it went down alongside).
                silent = sorted(p for p, t in changed.items() if now - t > self.timeout - 2 * self.interval)
                self._lose(silent, f"no heartbeat for {self.timeout:g} s")

    def _lose(self, lost: list[int], why: str) -> None:
        """Print the one line and exit at once: the main thread may be blocked in a collective with the lost one."""
        names = ", ".join(map(str, lost))
        after_bar = "\n" if self.me == 0 else ""  # process 0 draws the progress bar, which ends without a newline
        print(f"{after_bar}error: lost process {names} of {self.n} ({why}); relaunch all {self.n} processes with the "
              f"same command to resume from the last complete checkpoint", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if self.me != 0:
            try:
                self.client.key_value_set(f"{EXITING}{self.me}", "1", allow_overwrite=True)
            except Exception:  # noqa: BLE001
                pass
        else:  # the coordination service lives here: the others leave first, or JAX aborts them mid-line
            others = {str(p) for p in range(1, self.n) if p not in lost}
            deadline = time.monotonic() + self.timeout / 2
            while time.monotonic() < deadline:
                try:
                    if others <= {key.rsplit("/", 1)[-1] for key, _ in self.client.key_value_dir_get(EXITING)}:
                        break
                except Exception:  # noqa: BLE001
                    break
                time.sleep(0.05)
        os._exit(1)

    def stop(self) -> None:
        """Stop beating and tell the others that this process ended on its own (it is not lost)."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.thread.join()
        try:
            self.client.key_value_set(f"{BEATS}{self.me}", DONE, allow_overwrite=True)
        except Exception:  # noqa: BLE001
            pass


def start(timeout_s: float) -> None:
    """Start the watchdog of this process (after jax.distributed.initialize); stopped at exit."""
    global _watchdog
    import jax
    from jax._src import distributed  # the coordination service's client; orbax reads it the same way

    client = distributed.global_state.client
    if client is None or jax.process_count() == 1:
        return
    _watchdog = Watchdog(client, jax.process_index(), jax.process_count(), timeout_s)
    _watchdog.thread.start()
    atexit.register(_watchdog.stop)  # runs before JAX's own exit handler, which shuts the client down


def await_loss() -> None:
    """After a failed collective: give the watchdog one timeout to name a lost process (it then exits)."""
    if _watchdog is not None and not _watchdog.stopped.is_set():
        time.sleep(_watchdog.timeout + 3 * _watchdog.interval)
