"""FLOPs of a jitted computation: XLA's cost analysis of the compiled program, with scan loops counted in full.

XLA's cost analysis counts a loop's body once whatever its trip count: a Mamba scan over 128 tokens counts as one
token, scanned layers as one layer, gradient accumulation as one micro-batch. `compiled_flops` adds the missing
iterations of every `lax.scan` in the function's jaxpr, each body's cost again from XLA's cost analysis, and the
convolutions and attention of archlab's CPU kernels (models/cpu_kernels.py), custom calls whose cost XLA cannot see.
"""

from typing import Any, Callable

import jax
from jax.extend import core

from models import cpu_kernels


def xla_flops(compiled: Any) -> float:
    """FLOPs of a compiled computation by XLA's cost analysis (a multiply-add counts 2; loop bodies once)."""
    return float((compiled.cost_analysis() or {}).get("flops", 0.0))


def compiled_flops(fn: Callable, *args, compiled: Any = None) -> float:
    """FLOPs of `fn(*args)` (jitted or not; args may be jax.ShapeDtypeStruct): XLA's count with scans in full.

    `compiled`: the compiled `fn` for these args, when the caller has it already (else it is compiled here)."""
    if compiled is None:
        compiled = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args).compile()
    return xla_flops(compiled) + loop_flops(jax.make_jaxpr(fn)(*args).jaxpr, {})


def loop_flops(jaxpr: core.Jaxpr, cache: dict) -> float:
    """The FLOPs XLA leaves out of `jaxpr`: every scan's iterations beyond those it counts, nested scans included,
    and archlab's CPU kernels."""
    extra = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ffi_call":
            extra += cpu_kernels.kernel_flops(eqn.params["target_name"], [v.aval.shape for v in eqn.invars],
                                              [v.aval.shape for v in eqn.outvars], dict(eqn.params["attributes"]))
        elif eqn.primitive.name == "scan":
            body, n, unroll = eqn.params["jaxpr"], eqn.params["length"], eqn.params["unroll"]
            counted = n if unroll is True else min(max(int(unroll), 1), n)  # XLA's body holds `unroll` iterations
            extra += (n - counted) * body_flops(body, cache) + n * loop_flops(body.jaxpr, cache)
        else:
            for sub in core.jaxprs_in_params(eqn.params):
                extra += loop_flops(sub.jaxpr if isinstance(sub, core.ClosedJaxpr) else sub, cache)
    return extra


def body_flops(body: core.ClosedJaxpr, cache: dict) -> float:
    """XLA's FLOPs of one iteration of a scan body (layers share a body: compiled once per distinct body)."""
    key = str(body)
    if key not in cache:
        avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in body.jaxpr.invars]
        cache[key] = xla_flops(jax.jit(core.jaxpr_as_fun(body)).lower(*avals).compile())
    return cache[key]
