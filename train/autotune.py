"""`runtime.autotune`: on CPU, the train step compiled once per dot library, the fastest kept.

XLA's CPU backend computes dots with YNNPACK or with Eigen, and which is faster depends on the shapes: in this
repository's benchmark Eigen ran the 6-layer d 384 GPT's step 1.15x faster and the 4-layer d 128 GPT's 0.94x as
fast (README, Performance). So the step is compiled both ways, and the first training steps, which are real
steps of the run (both programs compute the same update), alternate between the two in timed windows; the faster
program runs the rest of the run. A window is as many steps as the loop runs in about WINDOW_SECONDS, dispatched
as the loop dispatches them and waited for at its end: one step waited for alone measures a different program
(the MLP's 1 ms step: Eigen's alone 0.9-1.0 ms against YNNPACK's 0.9-1.2, yet YNNPACK 1.10x faster in the loop).
Like `torch.backends.cudnn.benchmark`: a few seconds of compile time at the start for every step after it, and
off by default for the same reason: the choice depends on timings, the two libraries round differently, and a
re-run or a resumed run is then no longer bitwise identical to the first.
"""

import logging
import time
from collections.abc import Callable

import jax

from train.runtime import YNN_SWITCHES

log = logging.getLogger(__name__)

MIN_STEPS = 200  # runtime.autotune=auto tunes runs of at least this many steps (the extra compile pays off)
SIZING_ROUNDS = 2  # first, a step of each program alone: the first pays one-time set-up, the second sizes the windows
ROUNDS = 3  # then timed windows of each program, alternating
WINDOW_SECONDS = 0.2  # a timed window: as many steps as take about this long (0.05 s read the MLP's slower Eigen
# step as faster in 3 runs of 8, 0.2 s in none), at most MAX_WINDOW, and all of tuning within a quarter of the run
MAX_WINDOW = 256
MAX_TUNING_STEPS = 2 * (SIZING_ROUNDS + ROUNDS * MAX_WINDOW)  # of the two candidates
MARGIN = 0.05  # a program other than the first (the configured default) must be this much faster to be chosen
FUSION_TYPES = "xla_cpu_experimental_ynn_fusion_type"


def dot_candidates(runtime: dict) -> dict[str, dict[str, str]]:
    """Compiler options of each open dot-library choice under the `runtime` switches (one: nothing to tune)."""
    kept = [kind for key, kind in YNN_SWITCHES.items() if key != "ynn_dot_fusion_off" and not runtime[key]]
    options = lambda kinds: {FUSION_TYPES: ",".join(f"LIBRARY_FUSION_TYPE_{kind.upper()}" for kind in kinds)}
    if runtime["ynn_dot_fusion_off"]:
        return {"eigen": options(kept)}
    return {"ynnpack": options([*kept, YNN_SWITCHES["ynn_dot_fusion_off"]]), "eigen": options(kept)}


def applies(runtime: dict, steps: int) -> bool:
    """Whether to tune this run: `autotune` true, or auto and a run of MIN_STEPS or more; CPU, one process."""
    wanted = runtime["autotune"] is True or (runtime["autotune"] == "auto" and steps >= MIN_STEPS)
    return (wanted and jax.default_backend() == "cpu" and jax.process_count() == 1
            and len(dot_candidates(runtime)) > 1)


class Autotuned:
    """A jitted step that compiles itself once per candidate, times them in turn, then runs only the fastest."""

    def __init__(self, jitted: Callable, candidates: dict[str, dict[str, str]], steps: int, rounds: int = ROUNDS):
        self.jitted, self.candidates, self.rounds = jitted, candidates, rounds
        # the timed windows' steps at most, so that tuning ends within a quarter of the run's `steps`
        self.max_window = max(1, min(MAX_WINDOW, (steps // 4 - SIZING_ROUNDS * len(candidates))
                                     // (rounds * len(candidates))))
        self.compiled: dict[str, Callable] = {}
        self.seconds: dict[str, list[float]] = {name: [] for name in candidates}  # a step, one entry a window
        self.choice: str | None = None
        self.windows = 0  # windows run so far, sizing ones included
        self.window_steps = 1  # steps in a timed window, set by the last sizing round
        self.sizing: list[float] = []  # the sizing windows' seconds
        self.in_window, self.window_start = 0, 0.0

    def __call__(self, *args):
        if self.choice is not None:
            return self.compiled[self.choice](*args)
        if not self.compiled:
            lowered = self.jitted.lower(*args)
            self.compiled = {name: lowered.compile(compiler_options=options)
                             for name, options in self.candidates.items()}
        names = list(self.candidates)
        name, sizing = names[self.windows % len(names)], self.windows < SIZING_ROUNDS * len(names)
        if self.in_window == 0:
            self.window_start = time.perf_counter()
        out = self.compiled[name](*args)
        self.in_window += 1
        if self.in_window < (1 if sizing else self.window_steps):
            return out
        jax.block_until_ready(out)
        seconds = (time.perf_counter() - self.window_start) / self.in_window
        self.in_window, self.windows = 0, self.windows + 1
        if sizing:
            self.sizing.append(seconds)
            step = min(self.sizing[-len(names):])  # the faster program's step in the last sizing round
            self.window_steps = max(1, min(self.max_window, round(WINDOW_SECONDS / step)))
            return out
        self.seconds[name].append(seconds)
        if self.windows == (SIZING_ROUNDS + self.rounds) * len(names):
            self.choice = fastest(self.seconds)
            log.info("autotune: dots on %s (fastest window: %s ms a step; windows of %d steps)", self.choice,
                     ", ".join(f"{n} {1000 * min(s):.2f}" for n, s in self.seconds.items()),
                     self.window_steps, extra={"autotune_choice": self.choice})  # for scripts/bench.py
        return out


def fastest(seconds: dict[str, list[float]]) -> str:
    """The candidate with the fastest window: another process on the machine only ever adds time.

    The first candidate (the configured default) stays unless another is MARGIN faster.
    """
    first = next(iter(seconds))
    return min(seconds, key=lambda name: min(seconds[name]) * (1.0 if name == first else 1.0 + MARGIN))
