"""ONNX export (exporter choice, dynamic batch axis) that checks its own output, metadata stamping
and onnxruntime runs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gi_deploy.errors import ConfigError, DependencyError, ExportError, GateFailed
from gi_deploy.export import verify
from gi_deploy.export.options import DEFAULT_EXPORTER, EXPORTERS, OPSET

INPUT_NAME, OUTPUT_NAME = "input", "logits"
FEATURES_NAME = "features"  # the second output: the pooled features the logits are computed from
# Pooled features (after the head's norm, before the classifier) of the ONNX graph vs torch: the
# same maths in another summation order, like the logits; they are O(1) (layer-normed), so the
# logits' tolerance applies as it is.
FEATURES_ATOL = 1e-4


class WithFeatures(nn.Module):
    """A timm classifier returning ``(logits, features)``: float32 (N, C) and the pooled features
    (N, D) the classifier layer reads (``forward_head(pre_logits=True)``). The second output is
    free: the logits are the classifier layer applied to those features, so the graph pools once.
    Where that does not reproduce ``forward_head`` (a head that pools after its pre-logits, as VGG's
    does), both are computed from the backbone's features instead."""

    def __init__(self, model: nn.Module, example: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.classifier = _classifier_on_features(model, example)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.model.forward_features(x)
        feats = self.model.forward_head(f, pre_logits=True)
        logits = self.classifier(feats) if self.classifier is not None else self.model.forward_head(f)
        return logits, feats


def _classifier_on_features(model: nn.Module, example: torch.Tensor | None) -> nn.Module | None:
    """timm's classifier layer when ``classifier(pre-logits features)`` equals ``forward_head`` on
    ``example`` (checked, eval mode), else None."""
    get = getattr(model, "get_classifier", None)
    if example is None or not callable(get):
        return None
    classifier = get()
    try:
        with torch.no_grad():
            f = model.forward_features(example)
            same = torch.allclose(classifier(model.forward_head(f, pre_logits=True)), model.forward_head(f), atol=1e-6)
    except (RuntimeError, ValueError, TypeError):  # shapes that do not fit: the head does more than its classifier
        return None
    return classifier if same else None


def has_pooled_features(model: nn.Module) -> bool:
    """Whether ``model`` exposes timm's forward_features / forward_head(pre_logits=True)."""
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))


# The metadata_props key prefix of the essentials stamped into every ONNX file of a bundle.
METADATA_PREFIX = "gi_deploy."


@dataclass
class ExportedOnnx:
    """An fp32 ONNX file that passed its parity gate: its opset, its logits on the check inputs,
    and the gate's numbers (``verification``, the manifest's ``onnx_fp32`` entry)."""

    path: Path
    opset: int
    logits: np.ndarray
    verification: dict
    features_gate: dict | None = None  # the onnx_features gate, when the graph has a features output


def export_onnx(
    model: nn.Module,
    path: Path,
    input_size: tuple[int, int],
    opset: int = OPSET,
    exporter: str = DEFAULT_EXPORTER,
    inputs: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    what: str = "fp32 ONNX vs torch",
) -> ExportedOnnx:
    """Export ``model`` (eval mode, CPU, fp32) with a dynamic batch axis, then check the file: its
    onnxruntime logits on ``inputs`` (default: a few seeded random images) against ``reference``
    (default: ``model``'s own logits on them) must be within ``verify.FP32_ATOL`` with the same
    top-1 everywhere, the first input alone and the rest in chunks, so the dynamic batch axis is
    exercised. Raises GateFailed (the file is left for the caller to discard) or ExportError.

    The TorchScript exporter is the default, chosen deliberately: the dynamo exporter (torch's
    default since 2.9) has reported silent accuracy losses and fixed batch dims (pytorch#169178,
    #166797, #148886), and on the timm models we ship both give the same parity (measured in
    ``benchmarks/exporter_parity.py``). ``exporter="dynamo"`` is there for models the TorchScript
    tracer cannot handle. Either way the parity gates that follow decide whether the file is kept."""
    import onnx

    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter {exporter!r} unknown; use one of {', '.join(EXPORTERS)}")
    model = model.eval().cpu()
    example = torch.zeros(2, 3, *input_size)  # dynamo needs an example size >= 2 on a dynamic dim
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            if exporter == "dynamo":
                _export_dynamo(model, example, path, opset)
            else:
                outputs = [OUTPUT_NAME, FEATURES_NAME] if isinstance(model, WithFeatures) else [OUTPUT_NAME]
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=outputs,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                )
        except torch.onnx.errors.OnnxExporterError as e:
            first = str(e).strip().splitlines()[0]
            raise ExportError(
                f"ONNX export of {type(model).__name__} at {input_size[0]}x{input_size[1]} px failed: {first}. "
                "Some timm heads only export at their native size (VGG's pre_logits pools a feature map "
                "smaller than 7x7 up with adaptive pooling, which ONNX cannot express below 224 px): "
                "train at the model's default --img-size"
            ) from None
    onnx.checker.check_model(str(path))
    version = next(
        o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")
    )
    if inputs is None:
        inputs = np.random.default_rng(verify.VERIFY_SEED).standard_normal((3, 3, *input_size)).astype(np.float32)
    if reference is None:
        with torch.no_grad():
            out = model(torch.from_numpy(inputs))
            reference = (out[0] if isinstance(out, tuple) else out).numpy()
    logits, provider = run_onnx(path, inputs)
    gate = verify.check(
        "onnx_fp32",
        what,
        {
            **verify.compare_logits(reference, logits),
            "provider": provider,
            "batch_sizes": [1] + [min(RUN_CHUNK, len(inputs) - i) for i in range(1, len(inputs), RUN_CHUNK)],
        },
        atol=verify.FP32_ATOL,
        min_top1=verify.FP32_MIN_TOP1,
    )
    result = ExportedOnnx(path, version, logits, gate)
    if isinstance(model, WithFeatures):
        result.features_gate = features_gate(model, path, inputs, what)
    return result


def features_gate(model: WithFeatures, path: Path, inputs: np.ndarray, what: str) -> dict:
    """The ``onnx_features`` gate: the file's ``features`` output vs torch's pooled features,
    within ``FEATURES_ATOL``. Raises GateFailed."""
    with torch.no_grad():
        ref = model(torch.from_numpy(inputs))[1].numpy()
    feats = run_onnx_output(ort_session(path), inputs, FEATURES_NAME)
    finite = bool(np.isfinite(feats).all())
    diff = float(np.abs(ref - feats).max()) if finite else float("inf")
    result = {
        "max_abs_feature_diff": diff,
        "finite": finite,
        "finite_share": float(np.isfinite(feats).all(1).mean()),
        "n": int(len(inputs)),
        "dim": int(feats.shape[1]),
        "tolerance": FEATURES_ATOL,
    }
    if not finite:
        raise GateFailed(
            "onnx_features",
            what.replace("fp32 ONNX", "ONNX features"),
            "share of finite features",
            result["finite_share"],
            1.0,
            "equal to",
        )
    if diff > FEATURES_ATOL:
        raise GateFailed(
            "onnx_features",
            what.replace("fp32 ONNX", "ONNX features"),
            "max |Δfeature|",
            diff,
            FEATURES_ATOL,
            "at most",
        )
    return result


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    from importlib.util import find_spec

    if find_spec("onnxscript") is None:
        raise DependencyError(
            'the dynamo ONNX exporter needs onnxscript: pip install "gi-deploy[dynamo]", or use --exporter torchscript'
        )
    batch = torch.export.Dim("batch", min=1, max=4096)
    # dynamo implements opset >= 18 only; asking for 17 triggers a down-conversion that fails on
    # timm models and leaves 18 anyway, so ask for 18 (LayerNormalization exists from 17).
    outputs = [OUTPUT_NAME, FEATURES_NAME] if isinstance(model, WithFeatures) else [OUTPUT_NAME]
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=max(opset, 18),
        input_names=[INPUT_NAME],
        output_names=outputs,
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    program.save(str(path))


def set_metadata(path: Path, props: dict[str, object]) -> None:
    """Stamp ``props`` into the ONNX file's ``metadata_props`` (prefixed ``gi_deploy.``; values
    that are not strings are stored as JSON), so a lone .onnx file still says what it is."""
    import json

    import onnx

    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key = METADATA_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    onnx.save(model, str(path))


def read_metadata(path: Path) -> dict[str, str]:
    """The ``gi_deploy.`` metadata of an ONNX file, prefix stripped (values as stored)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key[len(METADATA_PREFIX) :]: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}


def ort_session(path: Path, providers: list[str] | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])


RUN_CHUNK = 32  # images per onnxruntime call: activations of convnextv2_base at 224 px are ~0.1 GB/image


def run_onnx(path: Path, inputs: np.ndarray, providers: list[str] | None = None) -> tuple[np.ndarray, str]:
    """Logits of ``path`` on ``inputs`` in onnxruntime and the provider that ran it. The first
    input runs alone, the rest in chunks of up to ``RUN_CHUNK``: sizes that differ from the
    export's example batch of 2, so the dynamic batch axis is exercised."""
    session = ort_session(path, providers)
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: inputs[:1]})[0]]
    for i in range(1, len(inputs), RUN_CHUNK):
        parts.append(session.run(None, {name: inputs[i : i + RUN_CHUNK]})[0])
    return np.concatenate(parts).astype(np.float32), session.get_providers()[0]


def run_onnx_output(session, inputs: np.ndarray, output: str) -> np.ndarray:
    """One named output of an onnxruntime ``session`` (:func:`ort_session`) on ``inputs`` (chunks
    of ``RUN_CHUNK``), float32."""
    name = session.get_inputs()[0].name
    parts = [session.run([output], {name: inputs[i : i + RUN_CHUNK]})[0] for i in range(0, len(inputs), RUN_CHUNK)]
    return np.concatenate(parts).astype(np.float32)
