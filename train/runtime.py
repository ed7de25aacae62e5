"""CPU settings measured in shared/DESIGN.md, applied before JAX starts its backend; each is a config switch."""

import ctypes
import ctypes.util
import importlib.util
import os
import sys
from pathlib import Path

# The `runtime` switches that take an op kind from YNNPACK, and XLA's name for that kind (train/autotune.py too).
YNN_SWITCHES = {"ynn_conv_fusion_off": "individual_convolution", "ynn_dot_fusion_off": "individual_dot",
                "ynn_reduce_fusion_off": "reduce"}

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def retain_freed_memory() -> None:
    """Keep freed memory in the process: XLA's per-step scratch buffers stop costing mmap + page zeroing."""
    if not sys.platform.startswith("linux") or not ctypes.util.find_library("c"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):  # not glibc
        return
    libc.mallopt(M_ARENA_MAX, 1)
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def split_cpu(devices: int) -> None:
    """Make the CPU `devices` XLA devices, so that the mesh splits each batch over them (data parallel in one
    process), each device's Eigen kernels on its own thread. Small kernels keep two cores busier this way than
    split inside each op (ViT-tiny 1.2-1.3x, Mamba 1.3x here; README Performance). An explicit device count in
    XLA_FLAGS (tests with 8 fake devices) wins."""
    add_xla_flags(f"--xla_force_host_platform_device_count={devices}", "--xla_cpu_multi_thread_eigen=false")


def add_xla_flags(*flags: str) -> None:
    """Append `flags` to XLA_FLAGS unless the first one's name is set there already (the user's choice wins)."""
    current = os.environ.get("XLA_FLAGS", "")
    if flags[0].split("=")[0] not in current:
        os.environ["XLA_FLAGS"] = " ".join([current, *flags]).strip()


def accelerator_installed() -> bool:
    """Whether a GPU or TPU plugin is installed (then CPU-only XLA flags must not be set)."""
    return any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu",
                                                      "jax_rocm60_plugin"))


def apply(keep_freed_memory: bool, ynn_conv_fusion_off: bool, compilation_cache: bool,
          ynn_dot_fusion_off: bool = False, ynn_reduce_fusion_off: bool = False, autotune: bool | str = False,
          cpu_devices: int = 1, cpu_kernels: bool = True) -> None:
    """Apply the switched-on settings (the config's `runtime` keys); call before the first JAX computation.

    `autotune` is read by the train loop (train/autotune.py); it is checked here, before JAX starts.
    """
    if autotune not in (True, False, "auto"):
        raise ValueError(f"runtime.autotune={autotune} is not valid (valid: true, false, auto)")
    if isinstance(cpu_devices, bool) or not isinstance(cpu_devices, int) or cpu_devices < 1:
        raise ValueError(f"runtime.cpu_devices={cpu_devices} is not valid (valid: a positive integer, "
                         f"the number of CPU devices the step is split over)")
    switches = {"keep_freed_memory": keep_freed_memory, "ynn_conv_fusion_off": ynn_conv_fusion_off,
                "compilation_cache": compilation_cache, "ynn_dot_fusion_off": ynn_dot_fusion_off,
                "ynn_reduce_fusion_off": ynn_reduce_fusion_off, "cpu_kernels": cpu_kernels}
    for key, value in switches.items():
        if not isinstance(value, bool):
            raise ValueError(f"runtime.{key}={value} is not a switch (valid: true, false)")
    if keep_freed_memory:
        retain_freed_memory()
    # XLA CPU hands convolutions, dots and reductions to YNNPACK unless told otherwise; then Eigen computes the
    # convolutions and dots, and XLA's own loop fusions the reductions (fused with what feeds them).
    off = [kind for key, kind in YNN_SWITCHES.items() if switches[key]]
    if off and not accelerator_installed():
        add_xla_flags("--xla_cpu_experimental_ynn_fusion_type=" + ",".join(f"-{kind}" for kind in off))
    if cpu_devices > 1 and not accelerator_installed():
        split_cpu(cpu_devices)
    import jax

    # On GPUs, threefry lowered as XLA ops is one large unrolled fusion per random tensor: GPT-2 small's init took
    # 3 minutes to compile on an H200. The kernel lowering draws the same bits; other backends ignore it.
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)
    if compilation_cache:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "archlab" / "jax"
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # small models compile in < 1 s too
    from models import cpu_kernels as kernels

    kernels.enable(cpu_kernels)
