"""Device choice, seeding and determinism, autocast and thread settings: the process-wide knobs."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import random
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from deepfit.errors import ConfigError

DEVICE_ENV = "DEEPFIT_DEVICE"  # what "auto" means in this process (the test suite sets it from DEEPFIT_TEST_DEVICE)
CUBLAS_WORKSPACE = ":4096:8"  # the cuBLAS workspace setting that makes its kernels deterministic
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc mallopt() parameters (<malloc.h>)


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks $DEEPFIT_DEVICE when set, else cuda, then mps, then cpu; an explicit device
    that is absent is an error."""
    if name == "auto" and os.environ.get(DEVICE_ENV, "auto") != "auto":
        name = os.environ[DEVICE_ENV]
        if name not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"${DEVICE_ENV} must be auto, cpu, cuda or mps; got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for, but MPS is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; make CPU kernels deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels everywhere (train.deterministic): cuDNN's deterministic algorithms,
    torch.use_deterministic_algorithms (ops without a deterministic CUDA kernel warn, naming the op),
    and cuBLAS's fixed workspace, which cuBLAS reads once, when it first starts: so this runs
    before any CUDA work (fit calls it first). On the CPU deepfit's kernels are deterministic anyway."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = enabled
    torch.use_deterministic_algorithms(enabled, warn_only=True)


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of handing it back to
    the system: the CPU's counterpart of CUDA's caching allocator. A training step frees and
    re-allocates hundreds of MB of activations and gradients; glibc serves blocks above 32 MB
    with mmap and unmaps them on free, and trims its heap's top, so every step page-faults the
    same memory back in. With no mmap (M_MMAP_MAX 0) and no trimming (M_TRIM_THRESHOLD -1) the
    blocks are reused: the CIFAR-10 recipe's epochs on 2 cores, 68 -> 49 s (README). The process
    keeps its peak memory until it exits. See keep_freed_memory_on. Linux with glibc only: False
    elsewhere."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, 64 << 20))
    return all(mallopt(param, value) == 1 for param, value in settings)


def keep_freed_memory_on(device: torch.device) -> bool:
    """keep_freed_memory() when `device` is the CPU (a GPU has its own caching allocator). fit and
    load_trained_model (evaluate, predict, serve) call it: 10-view TTA on CIFAR-10's test split
    measured 99 -> 53 s."""
    return device.type == "cpu" and keep_freed_memory()


def set_cudnn_benchmark(enabled: bool) -> None:
    """train.cudnn_benchmark: cuDNN times its convolution algorithms for each new input shape and
    keeps the fastest (airbench94 runs with it). The first batch of each shape pays the timing,
    and the choice may differ between runs, so train.deterministic excludes it. No effect on the CPU."""
    torch.backends.cudnn.benchmark = enabled


def set_threads(threads: int) -> None:
    """0 leaves torch's default (one thread per core, which measured fastest on 2 cores)."""
    if threads > 0:
        torch.set_num_threads(threads)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for full fp32. 'auto': bf16 where the
    device has native bf16 units (recent GPUs, CPUs with AVX512-BF16 or AMX), else fp32."""
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if precision == "32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a CUDA device; use bf16 or 32")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        warnings.warn("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 autocast runs slower than precision 32", stacklevel=2)
    return torch.float16 if precision == "fp16" else torch.bfloat16


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return device.type == "cpu" and cpu_has_bf16()


def cpu_has_bf16() -> bool:
    """Native bf16 matrix instructions (measured 1.6x faster than fp32 for fastnet on a Zen 4 core)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def default_cache_dir() -> str:
    return os.environ.get("DEEPFIT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "deepfit"))


def device_memory(device: torch.device) -> int:
    """Bytes of memory the device has: the GPU's total, or the machine's RAM (0 when unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows) or no such name
        return 0
