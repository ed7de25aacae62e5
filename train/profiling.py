"""`trainer.profile=[START,STOP]`: a jax.profiler trace of those steps, for TensorBoard's profile plugin or Perfetto."""

import logging
from collections.abc import Sequence
from pathlib import Path

import jax

log = logging.getLogger(__name__)


def check_profile(steps, total_steps: int) -> None:
    """One-line error unless `steps` is [START, STOP] with 0 <= START < STOP <= total_steps."""
    if not (isinstance(steps, Sequence) and len(steps) == 2 and all(isinstance(s, int) for s in steps)
            and 0 <= steps[0] < steps[1] <= total_steps):
        raise ValueError(f"trainer.profile={steps} is not a step range "
                         f"(valid: [START,STOP] with 0 <= START < STOP <= trainer.steps={total_steps})")


class Profile:
    """Traces the steps START..STOP-1 into `directory`; the trace ends once the last traced step has finished."""

    def __init__(self, steps, directory: Path):
        self.start, self.stop = steps
        self.directory = directory
        self.active = False

    def before(self, step: int, state) -> None:
        """Called before each step runs: starts the trace at START, ends it at STOP."""
        if step == self.start:
            jax.profiler.start_trace(str(self.directory))
            self.active = True
        elif step == self.stop:
            self.close(state)

    def close(self, state) -> None:
        """End the trace if one is running (at STOP, or when the run stops early)."""
        if self.active:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d..%d written to %s", self.start, self.stop - 1, self.directory)
