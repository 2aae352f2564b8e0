"""Start-up check for GPU serving: the node's NVIDIA driver must be new enough for torch's CUDA build.

The released GPU image installs torch's CUDA 13 build (the nvidia-*-cu13 wheels of the bento's lock);
CUDA 13 needs a driver of the 580 series or newer, and many clusters still run 535/550. With an older
driver torch only reports "CUDA unavailable" and the server would run on the CPU, slowly. A server
asked for a GPU (`SEG_DEVICE=cuda`) refuses to start instead, naming the driver it found and the one
it needs.
"""

from __future__ import annotations

import re
from pathlib import Path

# Oldest Linux driver branch each CUDA major version runs on (NVIDIA's CUDA toolkit release notes,
# "minor version compatibility": CUDA 12.x >= 525.60.13, CUDA 13.x >= 580.65.06).
MIN_DRIVER = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580, 65, 6)}
PROC_VERSION = Path("/proc/driver/nvidia/version")


class GPUError(RuntimeError):
    """The GPU this server was asked to use cannot run its torch build."""


def parse_version(text: str) -> tuple[int, ...]:
    """`"580.65.06"` -> `(580, 65, 6)`; raises ValueError on anything else."""
    if not re.fullmatch(r"\d+(\.\d+)*", text.strip()):
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in text.strip().split("."))


def required_driver(cuda: str) -> tuple[int, ...]:
    """The oldest NVIDIA driver for a torch built with CUDA `cuda` (`"13.0"`, `"12.6"`)."""
    major = parse_version(cuda)[0]
    if major not in MIN_DRIVER:
        raise GPUError(f"unknown CUDA version {cuda}: cannot tell which NVIDIA driver it needs")
    return MIN_DRIVER[major]


def check_driver(torch_cuda: str | None, driver: str | None) -> None:
    """Raise GPUError unless a torch built for CUDA `torch_cuda` (None: a CPU build) runs on `driver`.

    `driver` is the NVIDIA driver version of the node (`"550.54.15"`), None when none was found.
    """
    if torch_cuda is None:
        raise GPUError("a GPU was asked for (SEG_DEVICE=cuda) but this image's torch is a CPU build: "
                       "use the GPU image, or set SEG_DEVICE=cpu")
    if driver is None:
        raise GPUError("a GPU was asked for (SEG_DEVICE=cuda) but no NVIDIA driver is visible: give the "
                       "container a GPU (NVIDIA Container Toolkit; `nvidia.com/gpu` in Kubernetes), or set "
                       "SEG_DEVICE=cpu")
    needed = required_driver(torch_cuda)
    if parse_version(driver) < needed:
        raise GPUError(
            f"this image's torch is built for CUDA {torch_cuda}, which needs an NVIDIA driver "
            f"{'.'.join(map(str, needed))} or newer; this node's driver is {driver}. Update the driver, or "
            "use the image built for CUDA 12 (docs/deployment.md, \"Which image\")")


def driver_version(proc_version: Path = PROC_VERSION) -> str | None:
    """The loaded NVIDIA kernel driver's version (`"580.65.06"`), or None without one.

    Read through NVML (nvidia-ml-py, which BentoML installs) when its library is mounted, else from
    the kernel module's /proc file.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # no NVML library, or no driver behind it: try the kernel module's file
        pass
    try:
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", proc_version.read_text())
    except OSError:
        return None
    return found[1] if found else None


def check_cuda_device(device: str) -> None:
    """For a server asked to use `device` (`cuda`, `cuda:N`), fail now unless its driver fits torch."""
    if not device.startswith("cuda"):
        return
    import torch

    check_driver(torch.version.cuda, driver_version())
