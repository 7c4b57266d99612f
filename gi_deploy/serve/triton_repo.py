"""``gi-deploy export --triton-repo DIR``: a Triton model repository a full Triton server (on a GPU box)
runs as it is, written from the sealed bundles of a deploy folder, torch-free.

Per source ``S`` (names, dims and classes from its manifest and its ONNX file)::

    S_onnx/         onnxruntime_onnx: ``input`` FP32 (3, H, W) -> ``logits`` (C,) [+ ``features`` (D,)]
    S_trt/          tensorrt_plan, where the bundle has a built engine (same tensors; the engine's max batch)
    S_preprocess/   Python backend: ``image`` BYTES (1,) -> ``input`` (serve/triton_backend.Preprocess)
    S_postprocess/  Python backend: ``logits`` -> ``probabilities``, ``label``, ``confidence``
    S/              ensemble: preprocess -> onnx -> postprocess, bytes in, the answer out (as ``gi-deploy serve``)

and, with a router, ``auto/``: a Python-backend BLS model (an ensemble cannot branch) with a copy of the
router and of each source's manifest and in-distribution statistics; it calls ``S_onnx`` per routed source.
Every model batches dynamically (``max_batch``, ``max_queue_delay_ms``); ONNX models run ``instances``
instances on ``kind`` (KIND_GPU by default), the Python ones on the CPU. ``README.txt`` gives the
``tritonserver`` command and the container.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from gi_deploy.core.bundles import MODEL_FILES, list_bundles, read_bundle_manifest
from gi_deploy.core.router import ROUTER_DIR, load_router, router_dir
from gi_deploy.errors import BundleError, ConfigError
from gi_deploy.serve.models import AUTO, MAX_IMAGE_BYTES

KINDS = ("KIND_GPU", "KIND_CPU", "KIND_AUTO")
# The release of the server core PyTriton 0.7.0 bundles (Triton 2.51.0, what gi-deploy serve is tested on);
# gi-deploy installed in the container (README.txt) gives the Python models this package's decoding and routing.
CONTAINER = "nvcr.io/nvidia/tritonserver:24.10-py3"
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bytes": "TYPE_STRING", "bool": "TYPE_BOOL"}


@dataclass
class TritonRepoConfig:
    deploy_dir: Path
    out_dir: Path
    sources: list[str] | None = None  # None: every bundle
    precision: str = "fp32"  # which ONNX file of the bundle S_onnx serves
    max_batch: int = 32
    max_queue_delay_ms: float = 2.0
    instances: int = 1
    kind: str = "KIND_GPU"
    python_instances: int = 2
    max_image_bytes: int = MAX_IMAGE_BYTES
    force: bool = False

    def __post_init__(self) -> None:
        self.deploy_dir, self.out_dir = Path(self.deploy_dir), Path(self.out_dir)
        if self.kind not in KINDS:
            raise ConfigError(f"kind {self.kind!r} unknown; use one of {', '.join(KINDS)}")
        if self.precision not in MODEL_FILES:
            raise ConfigError(
                f"precision {self.precision!r}: the repository serves one of the bundle's ONNX files, "
                f"{', '.join(MODEL_FILES)}"
            )
        if min(self.max_batch, self.instances, self.python_instances) < 1 or self.max_queue_delay_ms < 0:
            raise ConfigError("max_batch, instances and python_instances must be >= 1, max_queue_delay_ms >= 0")


@dataclass
class TritonRepoResult:
    out_dir: Path
    models: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _q(text: str) -> str:
    """A protobuf text-format string literal (JSON's escapes are a subset it reads; UTF-8 kept as is)."""
    return json.dumps(text, ensure_ascii=False)


def _tensors(kind: str, tensors: list[tuple[str, str, list[int]]]) -> str:
    items = [
        f"  {{ name: {_q(n)} data_type: {_TYPES[t]} dims: [ {', '.join(map(str, dims))} ] }}" for n, t, dims in tensors
    ]
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _batching(cfg: TritonRepoConfig) -> str:
    return (
        f"max_batch_size: {cfg.max_batch}\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {int(cfg.max_queue_delay_ms * 1000)} }}\n"
    )


def _params(params: dict[str, str]) -> str:
    return "".join(f"parameters {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}\n" for k, v in params.items())


def _write(folder: Path, config: str, files: dict[str, Path | str] | None = None) -> None:
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(config, encoding="utf-8")
    for name, src in (files or {}).items():
        dst = folder / "1" / name
        if isinstance(src, Path):
            shutil.copyfile(src, dst)
        else:
            dst.write_text(src, encoding="utf-8")


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    """One ensemble step: ``model``'s tensors mapped to the ensemble's."""
    return (
        f'  {{ model_name: "{model}" model_version: -1\n'
        + "".join(f'    input_map {{ key: "{k}" value: "{v}" }}\n' for k, v in inputs.items())
        + "".join(f'    output_map {{ key: "{k}" value: "{v}" }}\n' for k, v in outputs.items())
        + "  }"
    )


def _python_model(cls: str) -> str:
    return (
        "# Written by `gi-deploy export --triton-repo`: the runtime's own code, imported (the Triton container's\n"
        "# Python needs gi-deploy installed; see ../../README.txt).\n"
        f"from gi_deploy.serve.triton_backend import {cls} as TritonPythonModel  # noqa: F401\n"
    )


def _onnx_io(path: Path) -> tuple[list[int], dict[str, int]]:
    """The ONNX file's input (C, H, W) and each output's last dimension, read with onnxruntime (the
    manifest names the classes, not the feature width)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    return [int(d) for d in inp.shape[1:]], {o.name: int(o.shape[-1]) for o in sess.get_outputs()}


def _source(cfg: TritonRepoConfig, source: str, notes: list[str]) -> list[str]:
    bundle = cfg.deploy_dir / source
    m = read_bundle_manifest(bundle)
    model_file = bundle / MODEL_FILES[cfg.precision]
    if not model_file.is_file():
        raise BundleError(
            f"{model_file} is missing: the bundle of {source} has no {cfg.precision} model; export it, "
            "or choose another --precision"
        )
    chw, outs = _onnx_io(model_file)
    classes = list(m.classes)
    if outs.get("logits") != len(classes):
        raise BundleError(f"{model_file}: logits has {outs.get('logits')} classes, its manifest {len(classes)}")
    out_tensors = [(n, "float32", [d]) for n, d in outs.items()]
    gpu = f"instance_group [ {{ count: {cfg.instances} kind: {cfg.kind} }} ]\n"
    cpu = f"instance_group [ {{ count: {cfg.python_instances} kind: KIND_CPU }} ]\n"
    root, names = cfg.out_dir, []
    _write(
        root / f"{source}_onnx",
        f'name: "{source}_onnx"\nplatform: "onnxruntime_onnx"\n'
        + _batching(cfg)
        + _tensors("input", [("input", "float32", chw)])
        + _tensors("output", out_tensors)
        + gpu,
        {"model.onnx": model_file},
    )
    names.append(f"{source}_onnx")
    engine = m.engine
    if engine is not None and engine.status == "built" and engine.file and (bundle / engine.file).is_file():
        trt_batch = int(engine.extra.get("max_batch", cfg.max_batch))
        _write(
            root / f"{source}_trt",
            f'name: "{source}_trt"\nplatform: "tensorrt_plan"\n'
            f"max_batch_size: {trt_batch}\ndynamic_batching {{ max_queue_delay_microseconds: "
            f"{int(cfg.max_queue_delay_ms * 1000)} }}\n"
            + _tensors("input", [("input", "float32", chw)])
            + _tensors("output", out_tensors)
            + f"instance_group [ {{ count: {cfg.instances} kind: KIND_GPU }} ]\n",
            {"model.plan": bundle / engine.file},
        )
        names.append(f"{source}_trt")
        notes.append(
            f"{source}_trt: the engine {engine.file} runs only on the GPU and TensorRT version that built "
            f"it ({engine.extra.get('target', 'see its manifest')}); the ensemble uses {source}_onnx"
        )
    pre = {"preprocess": json.dumps(m.preprocess.to_dict()), "max_image_bytes": str(cfg.max_image_bytes)}
    _write(
        root / f"{source}_preprocess",
        f'name: "{source}_preprocess"\nbackend: "python"\n'
        + _batching(cfg)
        + _tensors("input", [("image", "bytes", [1])])
        + _tensors("output", [("input", "float32", chw)])
        + cpu
        + _params(pre),
        {"model.py": _python_model("Preprocess")},
    )
    answer = [("probabilities", "float32", [len(classes)]), ("label", "bytes", [1]), ("confidence", "float32", [1])]
    _write(
        root / f"{source}_postprocess",
        f'name: "{source}_postprocess"\nbackend: "python"\n'
        + _batching(cfg)
        + _tensors("input", [("logits", "float32", [len(classes)])])
        + _tensors("output", answer)
        + cpu
        + _params({"source": source, "classes": json.dumps(classes)}),
        {"model.py": _python_model("Postprocess")},
    )
    steps = [
        _step(f"{source}_preprocess", {"image": "image"}, {"input": "pixels"}),
        _step(f"{source}_onnx", {"input": "pixels"}, {"logits": "logits"}),
        _step(f"{source}_postprocess", {"logits": "logits"}, {n: n for n, _, _ in answer}),
    ]
    _write(
        root / source,
        f'name: "{source}"\nplatform: "ensemble"\nmax_batch_size: {cfg.max_batch}\n'
        + _tensors("input", [("image", "bytes", [1])])
        + _tensors("output", answer)
        + "ensemble_scheduling {\n step [\n"
        + ",\n".join(steps)
        + "\n ]\n}\n"
        + _params({"classes": json.dumps(classes), "preprocess": json.dumps(m.preprocess.to_dict())}),
    )
    names += [f"{source}_preprocess", f"{source}_postprocess", source]
    return names


def _auto(cfg: TritonRepoConfig, sources: list[str]) -> str:
    router_sources = list(load_router(cfg.deploy_dir).sources)  # sealed: the order the router's columns mean
    missing = [s for s in router_sources if s not in sources]
    if missing:
        raise BundleError(
            f"the router routes to {', '.join(missing)}, which this repository has no model for; "
            "include them (--source) or leave auto out"
        )
    folder = cfg.out_dir / AUTO
    copy = folder / "1" / "deploy"
    shutil.copytree(router_dir(cfg.deploy_dir), copy / ROUTER_DIR)
    classes = []
    for s in router_sources:
        m = read_bundle_manifest(cfg.deploy_dir / s)
        (copy / s).mkdir(parents=True)
        for name in ("manifest.json", "labels.json"):
            shutil.copyfile(cfg.deploy_dir / s / name, copy / s / name)
        if m.ood is not None and m.ood.file:
            shutil.copyfile(cfg.deploy_dir / s / m.ood.file, copy / s / m.ood.file)
        classes += [c for c in m.classes if c not in classes]
    outs = [
        ("probabilities", "float32", [len(classes)]),
        ("label", "bytes", [1]),
        ("confidence", "float32", [1]),
        ("source", "bytes", [1]),
        ("router_confidence", "float32", [1]),
        ("id_score", "float32", [1]),
        ("id_threshold", "float32", [1]),
        ("rejected", "bool", [1]),
        ("reason", "bytes", [1]),
    ]
    _write(
        folder,
        f'name: "{AUTO}"\nbackend: "python"\n'
        + _batching(cfg)
        + _tensors("input", [("image", "bytes", [1])])
        + _tensors("output", outs)
        + f"instance_group [ {{ count: {cfg.python_instances} kind: KIND_CPU }} ]\n"
        + _params({"classes": json.dumps(classes), "max_image_bytes": str(cfg.max_image_bytes)}),
        {"model.py": _python_model("Auto")},
    )
    return AUTO


def _readme(cfg: TritonRepoConfig, models: list[str]) -> str:
    example = next((m for m in models if "_" not in m and m != AUTO), AUTO)
    return f"""Triton model repository written by `gi-deploy export --triton-repo` from {cfg.deploy_dir.resolve()}.
Models: {", ".join(models)}.

Run it on a GPU server with NVIDIA's Triton container {CONTAINER} (Triton 2.51, the server core
`gi-deploy serve` is tested on). Its Python backend runs the preprocessing, postprocessing and `auto` models
with gi-deploy's own code, so install gi-deploy (the torch-free core) into the container's Python from a
checkout of this project first:

  docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
    -v $PWD:/models -v /path/to/gi-deploy:/src {CONTAINER} \\
    bash -c "pip install /src && tritonserver --model-repository=/models"

Send the encoded image (BYTES, shape [N, 1]) as input "image" to a source's ensemble (`{example}`) or to `auto`,
exactly as to `gi-deploy serve` (docs/serving.md): the same outputs, the same answers.
"""


def write_triton_repo(cfg: TritonRepoConfig) -> TritonRepoResult:
    """Write the repository of ``cfg.deploy_dir``'s bundles (and its router) into ``cfg.out_dir``.
    Raises BundleError for a missing or altered bundle, ConfigError when ``out_dir`` exists and is not
    empty (``force`` replaces it)."""
    available = list_bundles(cfg.deploy_dir)
    if not available:
        raise BundleError(f"no bundles under {cfg.deploy_dir}; run `gi-deploy export` first")
    sources = available if not cfg.sources or "all" in cfg.sources else list(dict.fromkeys(cfg.sources))
    with_auto = AUTO in sources or (not cfg.sources and (router_dir(cfg.deploy_dir) / "manifest.json").is_file())
    sources = [s for s in sources if s != AUTO]
    unknown = [s for s in sources if s not in available]
    if unknown:
        raise BundleError(
            f"no bundle for {', '.join(unknown)} under {cfg.deploy_dir}; available: {', '.join(available)}"
        )
    if cfg.out_dir.exists() and any(cfg.out_dir.iterdir()):
        if not cfg.force:
            raise ConfigError(
                f"{cfg.out_dir} exists and is not empty; choose another folder, or replace it with --force"
            )
        shutil.rmtree(cfg.out_dir)
    staging = cfg.out_dir.with_name(f".{cfg.out_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    final, cfg.out_dir = cfg.out_dir, staging  # written aside, renamed into place once complete
    try:
        result = TritonRepoResult(out_dir=final)
        for s in sources:
            result.models += _source(cfg, s, result.notes)
        if with_auto:
            result.models.append(_auto(cfg, sources))
        (staging / "README.txt").write_text(_readme(cfg, result.models), encoding="utf-8")
        staging.replace(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        cfg.out_dir = final
    return result
