"""NHWC fp32 convolutions, max pooling and dense weight gradients (models/cpu_kernels.cc), attention
(models/cpu_attention.cc), BatchNorm's statistics (models/cpu_norm.cc) and Mamba's selective scan
(models/cpu_scan.cc) for the CPU, called from jitted code through XLA's FFI.

XLA's CPU convolutions (Eigen) were ResNet-20's and LeNet's bottleneck, and LeNet's max-pool gradient (YNNPACK's
tie count) its largest kernel; these run a 3x3 layer's forward, input gradient and weight gradient 2-5x faster
(README, Performance); attention's batched products and separate softmax passes run fused, 1.8-2.1x; a dense
layer's weight gradient, which XLA gives Eigen with transposed copies, 1.2x; BatchNorm's two per-channel sums in
one pass, 1.5-2.1x; the selective scan, a loop of small kernels per token in XLA, with its state in registers,
8-11x forward and backward at the Mamba LM's shape. The C++ files are compiled for this machine (`-march=native`)
the first time they are needed, into ~/.cache/archlab/native, keyed by the sources, the compiler flags, jaxlib's
version and the CPU; with no C++ compiler, or `runtime.cpu_kernels=false`, the helpers in models/layers.py and
models/sequential_scan.py compute with XLA alone.
"""

import contextlib
import fcntl
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name)
           for name in ("cpu_kernels.h", "cpu_kernels.cc", "cpu_attention.cc", "cpu_norm.cc", "cpu_scan.cc")]
TARGETS = {"archlab_conv_forward": "ArchlabConvForward", "archlab_conv_input_grad": "ArchlabConvInputGrad",
           "archlab_conv_weight_grad": "ArchlabConvWeightGrad",
           "archlab_dense_weight_grad": "ArchlabDenseWeightGrad", "archlab_max_pool": "ArchlabMaxPool",
           "archlab_max_pool_grad": "ArchlabMaxPoolGrad", "archlab_attention": "ArchlabAttention",
           "archlab_attention_grad": "ArchlabAttentionGrad",
           "archlab_channel_moments": "ArchlabChannelMoments", "archlab_selective_scan": "ArchlabSelectiveScan",
           "archlab_selective_scan_grad": "ArchlabSelectiveScanGrad"}
PREFIX = "archlab_"  # the registered names above start with it; another build's with its own (`register`)

_enabled = True
_loaded: bool | None = None  # None: not tried yet
_registers = 0  # the build's vector registers
_lock = threading.Lock()
_prefix = PREFIX  # the build the calls below are traced against (`tracing_with`)


def enable(on: bool) -> None:
    """`runtime.cpu_kernels`: whether the helpers in models/layers.py may use these kernels."""
    global _enabled
    _enabled = on


def _flags() -> list[str]:
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-mprefer-vector-width=512")  # 16-float vectors as one AVX-512 register where there is one
    return flags


@functools.cache
def _cpuinfo() -> list[str] | None:
    """/proc/cpuinfo's lines, None where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None


def _cpu_id() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags."""
    if _cpuinfo() is None:
        return platform.processor()
    return "\n".join(sorted({line for line in _cpuinfo() if line.startswith(("model name", "flags"))}))


def library_path(sources: list[Path] = SOURCES) -> Path:
    """Where this machine's build of `sources` (the kernels') lives, whether built yet or not."""
    import jaxlib

    texts = [f.read_text() for f in sources]
    key = hashlib.sha256("\0".join([*texts, *_flags(), jaxlib.__version__, _cpu_id()]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "archlab" / "native"
    return cache / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def build(path: Path, sources: list[Path] = SOURCES) -> None:
    """Compile `sources` into `path`, through a temporary folder whose library is renamed into place (processes may
    race to build). Each .cc compiles in its own compiler process, side by side: 19-26 s instead of 27-33 s on 2
    cores."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        units = [f for f in sources if f.suffix == ".cc"]
        objects = [f"{tmp}/{f.stem}.o" for f in units]
        _run([[compiler, *_flags(), "-I", jax.ffi.include_dir(), "-c", str(f), "-o", o]
              for f, o in zip(units, objects)])
        _run([[compiler, *_flags(), *objects, "-o", f"{tmp}/{path.name}"]])
        os.replace(f"{tmp}/{path.name}", path)


def _run(cmds: list[list[str]]) -> None:
    """Run the commands side by side; raise with the first failure's command and compiler messages."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in cmds]
    errors = [p.communicate()[1] for p in procs]
    for cmd, proc, stderr in zip(cmds, procs, errors):
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")


def available() -> bool:
    """Whether the kernels are switched on and loaded (building and registering them on the first call)."""
    global _loaded, _registers
    if not _enabled:
        return False
    with _lock:
        if _loaded is None:
            try:
                _registers = register(built())
                _loaded = True
            except Exception as err:  # no compiler, a failed build: XLA's convolutions still work
                log.warning("archlab's CPU kernels unavailable, using XLA's: %s", err)
                _loaded = False
    return _loaded


def built(sources: list[Path] = SOURCES) -> Path:
    """This machine's build of `sources`, compiled first where the cache has none: by one process, while others
    that need it too (a sweep's jobs, test workers) wait for that build rather than each compiling their own."""
    path = library_path(sources)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
            if not path.exists():
                build(path, sources)
    return path


def register(path: Path, prefix: str = PREFIX) -> int:
    """Load the build at `path` and register its handlers with XLA, each TARGETS name's PREFIX replaced by `prefix`
    (another build beside this one's: scripts/conv_bench.py --against); returns the build's vector registers."""
    import ctypes

    lib = ctypes.cdll.LoadLibrary(str(path))
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(prefix + name.removeprefix(PREFIX), jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return lib.ArchlabVectorRegisters()


@contextlib.contextmanager
def tracing_with(prefix: str):
    """Kernel calls traced inside call the build registered under `prefix` (`register`) instead of this one."""
    global _prefix
    saved, _prefix = _prefix, prefix
    try:
        yield
    finally:
        _prefix = saved


def intel() -> bool:
    """Whether the CPU is Intel's (/proc/cpuinfo's vendor_id GenuineIntel): a kernel choice measured per vendor."""
    return any(line.startswith("vendor_id") and line.split(":")[-1].strip() == "GenuineIntel"
               for line in _cpuinfo() or [])


def target(name: str) -> str:
    """The registered name that a call of kernel `name` (TARGETS, PREFIX dropped) traces to now."""
    return _prefix + name


def vector_registers() -> int:
    """The vector registers the kernels were built for (32 with AVX-512 or NEON, 16 with AVX2); 0 without them."""
    return _registers if available() else 0


def _conv(name: str, shape: tuple[int, ...], *args: jax.Array, strides, padding) -> jax.Array:
    attrs = dict(sh=np.int64(strides[0]), sw=np.int64(strides[1]),
                 pt=np.int64(padding[0][0]), pl=np.int64(padding[1][0]))
    return jax.ffi.ffi_call(target(f"conv_{name}"), jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="sequential")(*args, **attrs)


def conv_forward(x: jax.Array, w: jax.Array, strides, padding) -> jax.Array:
    """y = conv(x, w): x (N, H, W, C), w (kh, kw, C, D), padding ((pt, pb), (pl, pr))."""
    shape = lax.conv_general_shape_tuple(x.shape, w.shape, strides, padding, ("NHWC", "HWIO", "NHWC"))
    return _conv("forward", tuple(map(int, shape)), x, w, strides=strides, padding=padding)


def conv_input_grad(dy: jax.Array, w: jax.Array, x_shape, strides, padding) -> jax.Array:
    """dL/dx from dL/dy."""
    return _conv("input_grad", tuple(x_shape), dy, w, strides=strides, padding=padding)


def conv_weight_grad(x: jax.Array, dy: jax.Array, w_shape, strides, padding) -> jax.Array:
    """dL/dw from the layer's input and dL/dy."""
    return _conv("weight_grad", tuple(w_shape), x, dy, strides=strides, padding=padding)


DENSE_WIDTH = 16  # dense_weight_grad takes dy of a multiple of this many columns (a vector on every build)


def dense_weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """x^T dy for x (M, K) and dy (M, N), N a multiple of 16: a dense layer's weight gradient."""
    return jax.ffi.ffi_call(target("dense_weight_grad"), jax.ShapeDtypeStruct((x.shape[1], dy.shape[1]), jnp.float32),
                            vmap_method="sequential")(x, dy)


def kernel_flops(target: str, in_shapes, out_shapes, attributes: dict) -> float:
    """FLOPs of one call of a convolution, dense weight-gradient, attention or selective-scan kernel (2 per
    multiply-add), which XLA's cost analysis, blind to custom calls, leaves out (train/flops.py adds them).
    Attention counts the products a causal mask leaves (half) and not the backward's recomputed logits, as model
    FLOPs do; the scan's backward likewise leaves out its recomputed states."""
    if target.startswith("archlab_selective_scan"):  # dt (B, L, D), A (D, N): per (b, t, d, n) the forward's 6
        (b, length, d), n = in_shapes[0], in_shapes[1][1]  # (as XLA counts the lax.scan), the backward's 18
        return (18.0 if target.endswith("_grad") else 6.0) * b * length * d * n
    if target.startswith("archlab_attention"):
        (b, t, h, dh), s = in_shapes[0], in_shapes[1][1]
        products = 2 if target == "archlab_attention" else 4  # q k^T, p v; and dp, dq, dk, dv
        return products * 2.0 * b * h * t * s * dh / (2 if attributes.get("causal") else 1)
    if target == "archlab_dense_weight_grad":  # x (M, K), dy (M, N)
        return 2.0 * math.prod(in_shapes[0]) * in_shapes[1][1]
    if not target.startswith("archlab_conv_"):
        return 0.0
    if target == "archlab_conv_weight_grad":
        (_, dy), (w,) = in_shapes, out_shapes
    else:  # forward (x, w) -> y, input_grad (dy, w) -> dx
        (_, w), dy = in_shapes, (in_shapes[0] if target == "archlab_conv_input_grad" else out_shapes[0])
    return 2.0 * math.prod(dy) * math.prod(w) / w[-1]


MAX_WINDOW = 15  # max_pool records each maximum's window position in a byte


def max_pool(x: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """Max over window x window tiles of x (N, H, W, C), VALID, and where in its tile each maximum is (uint8)."""
    n, h, w, c = x.shape
    shape = (n, h // window, w // window, c)
    return jax.ffi.ffi_call(target("max_pool"), (jax.ShapeDtypeStruct(shape, jnp.float32),
                                                 jax.ShapeDtypeStruct(shape, jnp.uint8)),
                            vmap_method="sequential")(x, k=np.int64(window))


def max_pool_grad(dy: jax.Array, where: jax.Array, x_shape, window: int) -> jax.Array:
    """dL/dx: each tile's dL/dy to the first position of its maximum, zero elsewhere."""
    return jax.ffi.ffi_call(target("max_pool_grad"), jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32),
                            vmap_method="sequential")(dy, where, k=np.int64(window))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, key_mask: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """softmax(q k^T / sqrt(Dh)) v for q (B, T, H, Dh), k and v (B, S, H, Dh), and the log-sum-exp of each query's
    logits (B, H, T), which the backward pass recomputes the probabilities from. `key_mask`: (B or 1, S), True =
    attend (a padding mask; a batch with every key masked attends uniformly, as a select of a constant logit)."""
    b, t, h, _ = q.shape
    return jax.ffi.ffi_call(target("attention"), (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                                  jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
                            vmap_method="sequential")(q, k, v, _key_mask(key_mask), causal=np.int64(causal))


def attention_grad(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array, dout: jax.Array,
                   causal: bool, key_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of `attention` from its inputs, output, log-sum-exp and the output's cotangent."""
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
    return jax.ffi.ffi_call(target("attention_grad"), shapes, vmap_method="sequential")(
        q, k, v, _key_mask(key_mask), out, lse, dout, causal=np.int64(causal))


def _key_mask(key_mask: jax.Array | None) -> jax.Array:
    """The kernels' mask operand: 1.0 = attend, (B or 1, S); (1, 0) for none."""
    return jnp.zeros((1, 0), jnp.float32) if key_mask is None else key_mask.astype(jnp.float32)


def channel_moments(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel sum(a) and sum(a * b) over all but the last axis, in one pass: BatchNorm's statistics (a = b =
    x) and those of its gradient (a = dy, b = x)."""
    out = jax.ShapeDtypeStruct(a.shape[-1:], jnp.float32)
    return jax.ffi.ffi_call(target("channel_moments"), (out, out), vmap_method="sequential")(a, b)


SCAN_CHUNK = 64  # cpu_scan.cc's kChunk: the forward keeps the state entering every SCAN_CHUNK-th token
SCAN_MAX_STATES = 256  # cpu_scan.cc's kMaxStates


def selective_scan(dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, x: jax.Array, h0: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t, y_t = C_t h_t for dt, x (B, L, D), A (D, N) with dt A <= 0, B, C
    (B, L, N), h0 (B, D, N) -> y (B, L, D), the last state (B, D, N) and the state entering every SCAN_CHUNK-th
    token (B, chunks, N, D), which `selective_scan_grad` starts from."""
    (b, length, d), n = x.shape, A.shape[1]
    chunks = -(-length // SCAN_CHUNK)
    shapes = ((b, length, d), (b, d, n), (b, chunks, n, d))
    return jax.ffi.ffi_call(target("selective_scan"), tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes),
                            vmap_method="sequential")(dt, A, B, C, x, h0)


def selective_scan_grad(dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, x: jax.Array, chunk_states: jax.Array,
                        dy: jax.Array, dh_last: jax.Array) -> tuple[jax.Array, ...]:
    """(ddt, dA, dB, dC, dx, dh0) of `selective_scan` from its inputs, chunk states and the cotangents of y and the
    last state."""
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (dt, A, B, C, x, dh_last))
    return jax.ffi.ffi_call(target("selective_scan_grad"), shapes, vmap_method="sequential")(
        dt, A, B, C, x, chunk_states, dy, dh_last)
