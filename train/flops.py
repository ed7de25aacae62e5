"""FLOPs of a jitted computation: XLA's cost analysis, with scan loops counted in full.

XLA's cost analysis counts a loop's body once whatever its trip count: a Mamba scan over 128 tokens counts as one
token, scanned layers as one layer, gradient accumulation as one micro-batch. `compiled_flops` adds the missing
iterations of every `lax.scan` in the function's jaxpr, each body's cost again from XLA's cost analysis, and the
convolutions and attention of archlab's CPU kernels (models/cpu_kernels.py) and cuDNN's fused attention, custom
calls whose cost XLA cannot see.

On GPU and TPU the count is XLA's before its optimizations: the GPU pipeline turns dots into cuBLAS custom calls
that its cost analysis leaves out (GPT-2 small's step counted 3.84 TFLOP of ~14 on an H200, 2026-12-04). On the CPU
the two counts agree on dots, and the compiled one is kept.
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
    return xla_count(fn, args, compiled) + loop_flops(jax.make_jaxpr(fn)(*args).jaxpr, {})


def xla_count(fn: Callable, args: tuple, compiled: Any = None) -> float:
    """XLA's FLOPs of `fn(*args)`: of the compiled program on the CPU, of the program before optimization elsewhere."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    if jax.default_backend() != "cpu":
        return float((jitted.lower(*args).cost_analysis() or {}).get("flops", 0.0))
    return xla_flops(compiled or jitted.lower(*args).compile())


def loop_flops(jaxpr: core.Jaxpr, cache: dict) -> float:
    """The FLOPs XLA leaves out of `jaxpr`: every scan's iterations beyond those it counts, nested scans included,
    archlab's CPU kernels, cuDNN's fused attention and Pallas kernels (by their cost estimates)."""
    extra = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ffi_call":
            extra += cpu_kernels.kernel_flops(eqn.params["target_name"], [v.aval.shape for v in eqn.invars],
                                              [v.aval.shape for v in eqn.outvars], dict(eqn.params["attributes"]))
        elif eqn.primitive.name in ("dot_product_attention_fwd_wrapper", "dot_product_attention_bwd_wrapper"):
            layout = eqn.params.get("layout", 0)  # jax's AttentionLayout value: 0 BTNH (archlab's), 1 BNTH
            if getattr(layout, "value", layout) != 0:
                raise NotImplementedError(f"flops: cuDNN attention in layout {layout} (valid: BTNH, 0)")
            # counted as archlab's CPU attention kernel counts: q (B, T, N, H), k (B, S, N, H) in both
            target = "archlab_attention_grad" if eqn.primitive.name.endswith("bwd_wrapper") else "archlab_attention"
            causal = "CAUSAL" in str(eqn.params.get("mask_type"))  # PADDING_CAUSAL too
            extra += cpu_kernels.kernel_flops(target, [v.aval.shape for v in eqn.invars[:2]], [], {"causal": causal})
        elif eqn.primitive.name == "pallas_call":  # its kernel's jaxpr works on refs: the call's own estimate
            estimate = eqn.params.get("cost_estimate")  # Mosaic hands it to XLA's count on TPU; Triton drops it
            extra += estimate.flops if estimate is not None and jax.default_backend() != "tpu" else 0.0
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
        cache[key] = xla_count(core.jaxpr_as_fun(body), avals)
    return cache[key]
