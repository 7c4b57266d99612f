"""Verification gates: the thresholds every conversion must meet before its file is kept, the
comparison they use, and the fixed batch they run on.

Gates (numbers go into the bundle manifest under ``verification``):

=============== ===================================== ==========================================
gate            compares                              passes when
=============== ===================================== ==========================================
merge           merged torch model vs adapter model   max |Δlogit| <= MERGE_ATOL
                (CoLoRA in the paper's branch form,
                not the merge's own K0 + ΔK)
onnx_fp32       onnxruntime fp32 vs adapter model     max |Δlogit| <= FP32_ATOL, top-1 100%
onnx_fp16       onnxruntime fp16 vs fp32 ONNX         finite, top-1 >= FP16_MIN_TOP1
fp16_emulated   true-fp16 arithmetic vs fp32 ONNX     finite, top-1 >= FP16_MIN_TOP1
int8            onnxruntime int8 vs fp32 ONNX         top-1 >= INT8_MIN_TOP1 and validation
                                                      accuracy drop <= INT8_MAX_ACCURACY_DROP
engine          TensorRT engine vs fp32 ONNX          finite, top-1 >= FP16_MIN_TOP1
=============== ===================================== ==========================================
"""

from __future__ import annotations

# The batch, the agreement rule and the fp16/INT8 agreement thresholds live in core (the runtime's
# load-time gates use them too); imported here so every gate is read from one module.
from gi_deploy.core.verification import (  # noqa: F401
    FP16_MIN_TOP1,
    FP16_TIE_MARGIN,
    INT8_MIN_TOP1,
    STRESS_IMAGES,
    VERIFY_REAL_IMAGES,
    VERIFY_SEED,
    check,
    compare_logits,
    resolvable_share,
    split_images,
    stress_inputs,
    verification_batch,
)

# fp32 ONNX and the merged model vs the un-merged model: the same maths in another summation
# order; observed differences are ~1e-6 on logits, so 1e-4 catches any real error (the bound).
MERGE_ATOL = 1e-4
FP32_ATOL = 1e-4
FP32_MIN_TOP1 = 1.0
# INT8_MIN_TOP1's reasoning (core/verification.py) bounds the accuracy drop the same way.
INT8_MAX_ACCURACY_DROP = 0.01
# Below 100 validation images one image is more than a point (below 50, more than 2% agreement):
# the gates then allow one image, a net loss of one and one flip. Score >= 100 images for the bars.


def int8_allowed_drop(max_drop: float, n: int) -> float:
    """The accuracy drop the INT8 gate allows on ``n`` validation images: ``max_drop``, or one
    image where the set is too small to resolve ``max_drop``."""
    return max(max_drop, 1.0 / n)


def int8_thresholds(
    min_top1: float | None, max_drop: float | None, n: int, what: str
) -> tuple[float, float, list[str]]:
    """The INT8 gate's (least agreement, largest drop) on ``n`` images, and a note for each default
    that was relaxed. A threshold the user gave (not None) is the threshold, never relaxed; a default
    (None) is relaxed to one image where ``n`` is too small to resolve it, and the note says so."""
    notes = []
    if min_top1 is None:
        min_top1 = resolvable_share(INT8_MIN_TOP1, n)
        if min_top1 < INT8_MIN_TOP1:
            notes.append(
                f"INT8 gate on {n} {what}: default least agreement {INT8_MIN_TOP1:.0%} relaxed to "
                f"{min_top1:.1%} (all but one image); score more images or set --int8-min-agreement"
            )
    if max_drop is None:
        max_drop = int8_allowed_drop(INT8_MAX_ACCURACY_DROP, n)
        if max_drop > INT8_MAX_ACCURACY_DROP:
            notes.append(
                f"INT8 gate on {n} {what}: default largest accuracy drop {INT8_MAX_ACCURACY_DROP:.0%} "
                f"relaxed to {max_drop:.1%} (one image); score more images or set --int8-max-drop"
            )
    return min_top1, max_drop, notes
