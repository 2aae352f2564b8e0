"""scripts/image/torch_variant.py: reading a bento's lock (pins, CUDA version) and its Dockerfile.
The relock itself runs in `make image` (tests/image/test_image.py checks the image it builds)."""

from __future__ import annotations

import pytest
from image.torch_variant import bento_path, cuda_version, pins

GPU_LOCK = """--index-url https://pypi.org/simple

bentoml==1.4.40
cuda-toolkit==13.0.3.0
nvidia-cuda-runtime==13.0.96
nvidia-cudnn-cu13==9.20.0.48
Torch==2.13.0
"""


def test_pins_reads_every_pinned_package_by_lower_case_name():
    assert pins(GPU_LOCK) == {"bentoml": "1.4.40", "cuda-toolkit": "13.0.3.0", "nvidia-cuda-runtime": "13.0.96",
                              "nvidia-cudnn-cu13": "9.20.0.48", "torch": "2.13.0"}


@pytest.mark.parametrize(
    ("lock", "expected"),
    [(GPU_LOCK, "13.0"), ("torch==2.13.0+cu126\nnvidia-cuda-runtime-cu12==12.6.77\n", "12.6"),
     ("torch==2.13.0+cpu\nnvidia-ml-py==13.615.71\n", "none")],
)
def test_cuda_version_comes_from_the_cuda_runtime_wheel(lock, expected):
    assert cuda_version(lock) == expected


def test_bento_path_is_read_from_the_generated_dockerfile():
    dockerfile = "FROM x\nARG BENTO_PATH=/home/bentoml/bento\nENV BENTO_PATH=$BENTO_PATH\n"
    assert bento_path(dockerfile) == "/home/bentoml/bento"
    with pytest.raises(SystemExit):
        bento_path("FROM x\n")
