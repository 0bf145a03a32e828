"""Choosing the device once, and the process's place in a torchrun job."""
from __future__ import annotations

import ctypes
import os
import re
import sys


class OptionError(Exception):
    """A command-line option (or config value) that cannot work; the message names it and what it accepts."""


class DeviceError(OptionError):
    pass


DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(name: str) -> None:
    """A --device value is auto, cpu, cuda or cuda:N; anything else is refused before any work."""
    if not isinstance(name, str) or not DEVICE_RE.fullmatch(name):
        raise DeviceError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N")


def resolve_device(name: str = "auto"):
    """'auto' → cuda when available, else cpu, as a torch.device. Asking for cuda without one is an
    error, not a silent fallback."""
    check_device(name)
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    return dev


def device_name(name: str = "auto") -> str:
    """`resolve_device(name)` as a string, without importing torch (1.8 s) where the answer is the CPU:
    'auto' on a machine whose CUDA driver reports no device (or no driver) is 'cpu' straight away."""
    check_device(name)
    if name == "cpu" or (name == "auto" and not cuda_driver_sees_a_device()):
        return "cpu"
    return str(resolve_device(name))


def cuda_driver_sees_a_device() -> bool:
    """Whether the CUDA driver counts at least one device, asked through ctypes (as torch itself would,
    without loading torch). False is definite: torch would see no device either. True still leaves the
    last word to torch (a CPU-only torch build, for one)."""
    if "torch" in sys.modules:  # already paid for: ask it
        return sys.modules["torch"].cuda.is_available()
    return cuda_driver_device_count() > 0


def cuda_driver_device_count() -> int:
    """cuDeviceGetCount from the CUDA driver library (0 without a driver, or with CUDA_VISIBLE_DEVICES empty)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return 0
    for lib_name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(lib_name)
            break
        except OSError:
            continue
    else:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
STEADY_MMAP_THRESHOLD = 1 << 20


def steady_malloc(threshold: int = STEADY_MMAP_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold at `threshold` bytes (1 MiB) for this process and the workers it forks.

    glibc raises its threshold each time a mapped block is freed (up to 32 MiB), so after the first batch a
    CNN's 1-32 MiB activations come from the heap, where freed blocks fragment and the process's anonymous
    memory drifts up and down by hundreds of MiB over a long predict. Pinned, each such block is mapped and
    given back whole. Measured (BENCHMARKS §21): a 4,795-photo predict's main process peaked at 916 MiB
    anonymous instead of 1,267. What MALLOC_MMAP_THRESHOLD_ in the environment sets is left as it is;
    returns whether the threshold was set (False off glibc). `predict`, `evaluate` and `pseudo-label` call it."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
