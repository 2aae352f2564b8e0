"""The GPU start-up check: a torch CUDA build needs a new enough NVIDIA driver, and a server asked for a
GPU that cannot use one stops at start with the reason (never falls back to the CPU in silence)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from servers import DEMO_MODEL, ROOT, import_fixtures

from segmentation.serving.gpu import GPUError, check_cuda_device, check_driver, driver_version, required_driver


@pytest.mark.parametrize(
    ("torch_cuda", "driver"),
    [("13.0", "580.65.06"), ("13.0", "590.44.01"), ("12.6", "535.104.05"), ("12.8", "550.54.15"),
     ("12.1", "525.60.13")],
)
def test_new_enough_drivers_pass(torch_cuda, driver):
    check_driver(torch_cuda, driver)


@pytest.mark.parametrize(
    ("torch_cuda", "driver", "needed"),
    [("13.0", "550.54.15", "580.65.6"), ("13.0", "535.104.05", "580.65.6"), ("13.0", "580.65.05", "580.65.6"),
     ("12.6", "520.61.05", "525.60.13")],
)
def test_old_drivers_fail_naming_both_versions(torch_cuda, driver, needed):
    with pytest.raises(GPUError) as failure:
        check_driver(torch_cuda, driver)
    message = str(failure.value)
    assert f"CUDA {torch_cuda}" in message and needed in message and driver in message
    assert "CUDA 12" in message, "points at the image for older drivers"


def test_versions_compare_as_numbers_not_text():
    check_driver("13.0", "1000.1")  # "1000" < "580" as text
    with pytest.raises(GPUError):
        check_driver("13.0", "99.99")  # "99" > "580" as text


def test_a_cpu_torch_or_a_missing_driver_fails_with_its_own_reason():
    with pytest.raises(GPUError, match="CPU build"):
        check_driver(None, "580.65.06")
    with pytest.raises(GPUError, match="no NVIDIA driver"):
        check_driver("13.0", None)
    with pytest.raises(GPUError, match="unknown CUDA version 14.0"):
        required_driver("14.0")


def test_driver_version_is_read_from_the_kernel_modules_file(tmp_path, monkeypatch):
    # NVML is absent on machines without a GPU; stand in for it as "not loadable" everywhere.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
                    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    assert driver_version(proc) == "550.54.15"
    proc.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n")
    assert driver_version(proc) == "580.65.06"
    assert driver_version(tmp_path / "missing") is None


def test_only_cuda_devices_are_checked():
    check_cuda_device("cpu")
    check_cuda_device("auto")


def test_a_server_asked_for_cuda_with_a_cpu_torch_stops_at_start(tmp_path, tiny_fixtures):
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this environment's torch is a CUDA build: the CPU-build refusal cannot be shown here")
    home = tmp_path / "home"
    import_fixtures(home, tiny_fixtures)
    env = {**os.environ, "BENTOML_HOME": str(home), "SEG_MODELS": DEMO_MODEL, "SEG_DEVICE": "cuda"}
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service:Segmentation", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "cannot serve" in output and "CPU build" in output and "SEG_DEVICE=cpu" in output, output[-3000:]
