"""What this CPU offers the model: native bfloat16 or not, read once at start.

PyTorch multiplies bfloat16 matrices at native speed only on CPUs with AMX (`amx_bf16`) or AVX-512 BF16
(`avx512_bf16`): oneDNN's kernels. Elsewhere (AVX2 only, e.g. many AMD EPYC) it falls back to a
reference kernel that widens every element to float32 first. Measured on 2 AMD EPYC cores (AVX2) with
PaliGemma 2 3B's shapes (docs/benchmarks.md): the compute-bound 224 px prefill took 46 s in bfloat16
against 11 s in float32; the memory-bound decode step was faster in bfloat16 (half the bytes: 0.24 against
0.61 s at 1 row), so float32 answered faster up to about 100 tokens a request. `SEG_DTYPE=auto` considers
bfloat16 on a CPU only where `native_bfloat16`.

    from segmentation.model.cpu import cpu_info
    cpu_info()  # {"model": "AMD EPYC", "capability": "AVX2", "native_bfloat16": False, "via": None, ...}
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# /proc/cpuinfo flags that mean native bfloat16 matrix arithmetic, best first, and their names in words.
NATIVE_BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX-512 BF16"}


def _proc_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, set[str]]:
    """The model name and flags of the first processor in /proc/cpuinfo (Linux); (None, set()) elsewhere."""
    try:
        text = path.read_text()
    except OSError:
        return None, set()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def native_bfloat16_via(flags: set[str], torch_says: dict[str, bool] | None = None) -> str | None:
    """The instruction set that gives native bfloat16 matmuls ("AMX", "AVX-512 BF16"), or None.

    `flags`: /proc/cpuinfo's; `torch_says`: torch's own checks (`amx`, `avx512_bf16`), which also work
    where /proc is missing. Either source suffices."""
    torch_says = torch_says or {}
    if "amx_bf16" in flags or torch_says.get("amx"):
        return NATIVE_BF16_FLAGS["amx_bf16"]
    if "avx512_bf16" in flags or torch_says.get("avx512_bf16"):
        return NATIVE_BF16_FLAGS["avx512_bf16"]
    return None


def _torch_checks() -> dict[str, bool]:
    """torch's cpuinfo-based checks (private helpers of torch.cpu; absent ones count as False)."""
    import torch

    checks = {}
    for name, helper in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        try:
            checks[name] = bool(getattr(torch.cpu, helper)())
        except Exception:  # noqa: BLE001 -- a private helper that moved or failed: the flags still decide
            checks[name] = False
    return checks


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """This machine's CPU as the engine sees it: `model` (its name), `capability` (the vector instructions
    torch's kernels use: `torch.backends.cpu.get_cpu_capability()`), `native_bfloat16` and `via` (the
    instruction set, or None), `flags` (the relevant /proc/cpuinfo flags found). Read once."""
    import torch

    model, flags = _proc_cpuinfo()
    via = native_bfloat16_via(flags, _torch_checks())
    return {
        "model": model or platform.processor() or platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bfloat16": via is not None,
        "via": via,
        "flags": sorted(f for f in flags if f in NATIVE_BF16_FLAGS or f.startswith(("avx512", "amx", "avx2"))),
    }


def describe_cpu(info: dict | None = None) -> str:
    """One line for the log: the CPU, torch's capability and whether bfloat16 is native."""
    info = info or cpu_info()
    native = f"yes ({info['via']})" if info["native_bfloat16"] else "no (neither amx_bf16 nor avx512_bf16)"
    return f"CPU {info['model']}, torch capability {info['capability']}, native bfloat16: {native}"
