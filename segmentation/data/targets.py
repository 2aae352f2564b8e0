"""Users' masks to PaliGemma's training text: the library's `segmentation.model.targets`, under the
name the data tools (fine-tuning sets, evaluation) have always used."""

from ..model.targets import (  # noqa: F401
    MASK_SIZE,
    Box,
    ObjectMask,
    TargetError,
    binary_mask,
    check_box,
    check_label,
    crop_to_64,
    encode_object,
    encode_objects,
    location_bins,
    object_text,
    tight_box,
)
