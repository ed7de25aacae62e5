"""`runtime.autotune`: on CPU, the train step compiled once per dot library, the fastest kept.

XLA's CPU backend computes dots with YNNPACK or with Eigen, and which is faster depends on the shapes: in this
repository's benchmark Eigen ran the 6-layer d 384 GPT's step 1.15x faster and the 4-layer d 128 GPT's 0.94x as
fast (README, Performance). So the step is compiled both ways, and the first training steps, which are real
steps of the run (both programs compute the same update), alternate between the two and are timed; the faster
program runs the rest of the run. Like `torch.backends.cudnn.benchmark`: a few seconds of compile time at the
start for every step after it, and off by default for the same reason: the choice depends on timings, the two
libraries round differently, and a re-run or a resumed run is then no longer bitwise identical to the first.
"""

import logging
import time
from collections.abc import Callable

import jax

from train.runtime import YNN_SWITCHES

log = logging.getLogger(__name__)

MIN_STEPS = 200  # runtime.autotune=auto tunes runs of at least this many steps (the extra compile pays off)
ROUNDS = 4  # timed calls of each program; the first of each is dropped (one-time set-up inside the kernels)
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

    def __init__(self, jitted: Callable, candidates: dict[str, dict[str, str]], rounds: int = ROUNDS):
        self.jitted, self.candidates, self.rounds = jitted, candidates, rounds
        self.compiled: dict[str, Callable] = {}
        self.seconds: dict[str, list[float]] = {name: [] for name in candidates}
        self.choice: str | None = None
        self.calls = 0

    def __call__(self, *args):
        if self.choice is not None:
            return self.compiled[self.choice](*args)
        if not self.compiled:
            lowered = self.jitted.lower(*args)
            self.compiled = {name: lowered.compile(compiler_options=options)
                             for name, options in self.candidates.items()}
        names = list(self.candidates)
        name = names[self.calls % len(names)]
        start = time.perf_counter()
        out = jax.block_until_ready(self.compiled[name](*args))
        self.seconds[name].append(time.perf_counter() - start)
        self.calls += 1
        if self.calls == self.rounds * len(names):
            self.choice = fastest(self.seconds)
            log.info("autotune: dots on %s (fastest step: %s ms)", self.choice,
                     ", ".join(f"{n} {1000 * min(s[1:]):.1f}" for n, s in self.seconds.items()),
                     extra={"autotune_choice": self.choice})  # for scripts/bench.py
        return out


def fastest(seconds: dict[str, list[float]]) -> str:
    """The candidate with the fastest call after the first: another process on the machine only ever adds time.

    The first candidate (the configured default) stays unless another is MARGIN faster.
    """
    first = next(iter(seconds))
    return min(seconds, key=lambda name: min(seconds[name][1:]) * (1.0 if name == first else 1.0 + MARGIN))
