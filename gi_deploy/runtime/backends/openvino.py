"""The OpenVINO backend: a bundle's ONNX file (the fp32 ``model.onnx``, read at fp32 or bf16, or the
INT8 QDQ ``model.int8.onnx``) compiled by OpenVINO for the CPU, the engine Intel made for its own
CPUs (AMX, AVX-512 bf16/VNNI), iGPUs and NPUs.

Every load is gated: the compiled model's logits on the bundle's verification batch (the run's
validation images where they are on this machine, and the eight stress images, rebuilt the same
way export built them: core/verification.py) are compared with the fp32 ONNX on onnxruntime, by
the rule export held the fp16 file to (finite, top-1 agreement >= FP16_MIN_TOP1 outside near-ties)
or, for the INT8 file, the INT8 agreement rule. A model that disagrees raises GateFailed and never
classifies anything. The precision OpenVINO really ran (``INFERENCE_PRECISION_HINT`` read back from
the compiled model) is in ``detail`` and the gate's numbers are the first note: both are printed by
``infer`` and recorded in its metrics JSON.

openvino is imported inside the functions (the ``[openvino]`` extra): importing this module needs
nothing beyond the base install.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np

from gi_deploy.core.bundles import BundleManifest
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.core.runs import RUN_MANIFEST, read_run_manifest
from gi_deploy.core.verification import (
    FP16_MIN_TOP1,
    FP16_TIE_MARGIN,
    INT8_MIN_TOP1,
    check,
    compare_logits,
    resolvable_share,
    stress_inputs,
    verification_batch,
)
from gi_deploy.errors import ConfigError, DependencyError
from gi_deploy.runtime.backends.base import Backend, cpu_threads
from gi_deploy.runtime.backends.onnxruntime import model_file, open_onnxruntime

OV_DEVICE = "CPU"
# precision asked -> (the bundle file it reads, OpenVINO's inference precision for the ops the file
# does not quantise). INT8 keeps its float ops at f32, as onnxruntime runs them, so the two INT8 rows
# differ by engine only and the file's export gate (run at fp32 around the int8 ops) still describes it.
PLANS = {"fp32": ("fp32", "f32"), "bf16": ("fp32", "bf16"), "int8": ("int8", "f32")}
INSTALL = "pip install 'gi-deploy[openvino]'"


def openvino_installed() -> bool:
    return find_spec("openvino") is not None


def cpu_capabilities() -> list[str]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of this CPU (e.g. FP32, BF16, INT8): whether bf16 runs
    natively (AVX-512 BF16 or AMX) rather than emulated."""
    import openvino as ov

    return list(ov.Core().get_property(OV_DEVICE, "OPTIMIZATION_CAPABILITIES"))


def _check_request(precision: str, device: str) -> None:
    if device == "cuda":
        raise ConfigError(
            "--backend openvino runs on the CPU here (its GPU plugin is Intel's iGPU, not CUDA); use "
            "--device cpu or auto, or --backend tensorrt/torch on an NVIDIA GPU"
        )
    if precision not in PLANS:
        raise ConfigError(
            f"--backend openvino runs {', '.join(PLANS)} on the CPU, not {precision}; fp16 is the GPU's "
            "(use --precision bf16 on a CPU with bf16)"
        )
    if not openvino_installed():
        raise DependencyError(f"--backend openvino: openvino is not installed; {INSTALL}")
    if precision == "bf16" and "BF16" not in (caps := cpu_capabilities()):
        raise ConfigError(
            f"--precision bf16: this CPU has no native bf16 (OpenVINO lists {', '.join(caps)}); use "
            "--precision fp32 or int8"
        )


def gate_inputs(manifest: BundleManifest, spec: PreprocessSpec) -> tuple[np.ndarray, str]:
    """The bundle's verification batch, float32 (N, 3, H, W), and what it holds: the run's validation
    images where the run is on this machine (the batch every export gate ran on), else the stress
    images alone (an edge box without the training data)."""
    run_dir = Path(manifest.training.run_dir)
    if (run_dir / RUN_MANIFEST).is_file():
        x, info = verification_batch(read_run_manifest(run_dir), spec)
        return x, f"{info['real_images']} validation + {len(info['stress_images'])} stress images"
    x = stress_inputs(spec)
    return x, f"{len(x)} stress images (the training run's validation images are not on this machine)"


def _gate(
    name: str, run, reference, precision: str, ran: str, manifest: BundleManifest, x: np.ndarray, what: str
) -> dict:
    """OpenVINO's logits on ``x`` against the fp32 ONNX's; raises GateFailed. fp32/bf16: the fp16 rule
    (bf16 keeps fewer digits than fp16, so near-ties are left out the same way); int8: the threshold
    the INT8 file's own verification-batch gate used at export, else the default, resolvable on N."""
    ref, cand = reference(x), run(x)
    if precision == "int8":
        recorded = (manifest.verification.get("int8") or {}).get("verification_batch") or {}
        min_top1 = recorded.get("min_top1_agreement", resolvable_share(INT8_MIN_TOP1, len(x)))
        result = compare_logits(ref, cand)
    else:
        min_top1, result = FP16_MIN_TOP1, compare_logits(ref, cand, FP16_TIE_MARGIN)
    result["inputs"] = what
    return check(
        "openvino",
        f"{name} OpenVINO {ran} vs fp32 ONNX on {what}",
        result,
        min_top1=min_top1,
        hint=f"OpenVINO's {ran} answers differ from the verified fp32 model: use --backend onnxruntime"
        + (" or --precision fp32" if precision != "fp32" else ""),
    )


def _compile(core, path: Path, config: dict):
    """The ONNX file read and compiled for the CPU (a seam the gate's test plants a wrong model at)."""
    return core.compile_model(core.read_model(str(path)), OV_DEVICE, config)


def open_openvino(
    bundle_dir: Path,
    manifest: BundleManifest,
    precision: str,
    device: str = "cpu",
    threads: int | None = None,
    check_hash: bool = True,
) -> Backend:
    """The bundle's ONNX compiled by OpenVINO for the CPU at ``precision`` (fp32 | bf16 | int8), gated
    against the fp32 ONNX before it is returned. Raises ConfigError (fp16, a GPU, bf16 on a CPU
    without it), DependencyError (no openvino, or no onnxruntime for the gate's reference),
    BundleError (missing or altered file) and GateFailed (answers that disagree)."""
    _check_request(precision, device)
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    file_precision, hint = PLANS[precision]
    path = model_file(bundle_dir, manifest, file_precision, check_hash)
    core = ov.Core()
    config = {
        hints.inference_precision: {"f32": ov.Type.f32, "bf16": ov.Type.bf16}[hint],
        # infer calls one batch at a time, synchronously: one stream over every core (LATENCY), not
        # THROUGHPUT's several streams, which only pay with many requests in flight
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        props.inference_num_threads: threads or cpu_threads(),
    }
    compiled = _compile(core, path, config)
    ran = compiled.get_property(hints.inference_precision).get_type_name()  # what the plugin settled on
    ran = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(ran, ran)
    ran = f"int8 (QDQ) + {ran}" if precision == "int8" else ran
    outputs = {name: out for out in compiled.outputs for name in out.get_names()}
    logits_out = outputs.get("logits", compiled.outputs[0])
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})[logits_out]

    spec = manifest.preprocess
    x, what = gate_inputs(manifest, spec)
    reference = open_onnxruntime(bundle_dir, manifest, "fp32", "cpu", threads, check_hash)
    gate = _gate(manifest.source, run, reference.run, precision, ran, manifest, x, what)
    n_threads = compiled.get_property(props.inference_num_threads)
    b = Backend(
        "openvino",
        precision,
        f"OpenVINO {ov.__version__.split('-')[0]} {OV_DEVICE} {ran} ({path.name}, {n_threads} threads)",
        run,
        [
            f"openvino: gate passed, {ran} vs the fp32 ONNX on {what}: top-1 agreement "
            f"{gate['top1_agreement']:.1%} (least {gate['min_top1_agreement']:.1%}"
            + (f", {gate['ties']} near-ties left out" if gate.get("ties") else "")
            + f"), max |Δlogit| {gate['max_abs_logit_diff']:.4f}"
        ],
        path.stat().st_size,
        device="cpu",
        spec=spec,
    )
    if "features" in outputs:  # bundle format 3: one call gives both
        features_out = outputs["features"]

        def run_features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            out = request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
            return out[logits_out], out[features_out]

        b.run_features = run_features
    b.gate = gate
    return b
