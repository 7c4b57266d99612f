"""Typed errors. Library code raises these with the offending value and the fix; only the CLI
turns them into a one-line message and an exit code."""

from __future__ import annotations


class GiDeployError(Exception):
    """Base class: every error gi-deploy raises on purpose derives from this."""


class ConfigError(GiDeployError, ValueError):
    """A configuration field has an invalid value."""


class DataError(GiDeployError):
    """A dataset folder, image or label does not have the expected layout or content."""


class WeightsError(GiDeployError):
    """Base weights could not be obtained or do not match the model."""


class VerificationError(GiDeployError):
    """A conversion (merge, ONNX, fp16) produced outputs outside its tolerance. Nothing was written."""


class GateFailed(VerificationError):
    """A named verification gate (merge, onnx_fp32, onnx_fp16, fp16_emulated, int8, engine) failed:
    carries the gate, the measured number and the threshold it missed. Nothing was written."""

    def __init__(
        self, gate: str, what: str, metric: str, value: float, threshold: float, relation: str, hint: str = ""
    ):
        self.gate, self.metric, self.value, self.threshold = gate, metric, value, threshold
        super().__init__(
            f"gate {gate} failed for {what}: {metric} {value:.4g}, must be {relation} {threshold:g}"
            + (f" ({hint})" if hint else "")
            + "; nothing written"
        )


class ExportError(GiDeployError):
    """A model could not be converted (the ONNX exporter refused an operator). Nothing was written."""


class ExportFailed(GiDeployError):
    """One or more sources failed to export; the others were exported. Carries both."""

    def __init__(self, exported: dict, failures: dict[str, Exception]):
        self.exported, self.failures = exported, failures
        lines = [
            f"{len(failures)} source(s) failed to export"
            + (f" ({', '.join(exported)} exported fine)" if exported else "")
            + ":"
        ]
        lines += [f"  {source}: {error}" for source, error in failures.items()]
        super().__init__("\n".join(lines))


class BundleError(GiDeployError):
    """A run directory or deployment bundle is missing, incomplete or inconsistent."""


class DependencyError(GiDeployError, ImportError):
    """An optional dependency needed by this command is not installed."""


class TrainingInterrupted(GiDeployError):
    """Training was stopped (Ctrl-C); the last complete epoch is checkpointed and can be resumed."""


class TrainingDiverged(GiDeployError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class DistributedError(GiDeployError):
    """A multi-process (torchrun) training job failed: a rank died, or the ranks disagree on the
    split or on merged weights. Names the rank and the cause; the last complete epoch is kept."""
