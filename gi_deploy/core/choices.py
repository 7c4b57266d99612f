"""The named choices several stages and the CLI share (devices, precisions, runtime backends), as
``str`` Enums: the CLI offers exactly these, and the library validates against them."""

from __future__ import annotations

from enum import Enum


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    """The bundle's ONNX files are fp32, fp16 and int8; bf16 is the torch backend's (autocast on CUDA) and
    OpenVINO's (the fp32 file run in bf16 on a CPU that has it)."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


class BackendName(str, Enum):
    """Runtime backends (runtime/backends/select.py). ``auto`` picks the fastest one present."""

    auto = "auto"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"
    torch = "torch"
    openvino = "openvino"


def values(enum: type[Enum]) -> tuple[str, ...]:
    return tuple(e.value for e in enum)


DEVICES = values(Device)
PRECISIONS = values(Precision)
BACKENDS = values(BackendName)
