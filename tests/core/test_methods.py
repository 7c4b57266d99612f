"""The method registry is the one place a method is defined: the config, the CLI's choices, what a
run keeps and whether export merges all come from it."""

import dataclasses
import logging

import pytest

from gi_deploy.core.fields import default_of, help_of
from gi_deploy.core.methods import METHODS, Method, MethodSpec, method_spec
from gi_deploy.core.runs import ADAPTER_DIR, COLORA_WEIGHTS, FULL_WEIGHTS, HEAD_WEIGHTS
from gi_deploy.errors import ConfigError
from gi_deploy.training.config import TrainConfig


def test_every_method_says_what_it_trains_keeps_and_merges():
    expected = {  # name: (adapters, trains backbone, artifact, head in, merges)
        "lora": (("lora",), False, (ADAPTER_DIR,), ADAPTER_DIR, True),
        "full": ((), True, (FULL_WEIGHTS,), FULL_WEIGHTS, False),
        "linear": ((), False, (HEAD_WEIGHTS,), HEAD_WEIGHTS, False),
        "colora": (("colora",), False, (COLORA_WEIGHTS,), COLORA_WEIGHTS, True),
        "lora+colora": (("lora", "colora"), False, (ADAPTER_DIR, COLORA_WEIGHTS), ADAPTER_DIR, True),
    }
    got = {m.name: (m.adapters, m.trains_backbone, m.artifact, m.head_in, m.merges) for m in METHODS.values()}
    assert got == expected


def test_cli_choices_and_config_validation_come_from_the_registry(tmp_path):
    assert [m.value for m in Method] == list(METHODS)
    with pytest.raises(
        ConfigError, match="method 'dora' unknown; use one of lora, full, linear, colora, lora\\+colora"
    ):
        method_spec("dora")
    with pytest.raises(ConfigError, match="method 'dora' unknown"):
        TrainConfig(source="s", data_dir=tmp_path, method="dora")
    for m in METHODS.values():  # the --method help lists every registered method with its description
        assert f"{m.name}: {m.help}" in help_of(TrainConfig, "method")


def test_a_spec_that_contradicts_itself_is_refused():
    with pytest.raises(ConfigError, match="not one of its artifact entries"):
        MethodSpec("x", "", ("lora",), False, (ADAPTER_DIR,), HEAD_WEIGHTS)
    with pytest.raises(ConfigError, match="adapters or the whole backbone, not both"):
        MethodSpec("x", "", ("lora",), True, (ADAPTER_DIR,), ADAPTER_DIR)


def test_artifact_files_and_bytes_follow_the_spec(tmp_path):
    (tmp_path / ADAPTER_DIR).mkdir()
    (tmp_path / ADAPTER_DIR / "adapter_model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / ADAPTER_DIR / "adapter_config.json").write_bytes(b"y" * 5)
    (tmp_path / COLORA_WEIGHTS).write_bytes(b"z" * 7)
    spec = method_spec("lora+colora")
    assert spec.artifact_files(tmp_path) == [
        tmp_path / ADAPTER_DIR / "adapter_model.safetensors",
        tmp_path / COLORA_WEIGHTS,
    ]
    assert spec.artifact_bytes(tmp_path) == 22


def test_help_and_defaults_are_written_once_on_the_fields():
    assert default_of(TrainConfig, "lr") == 1e-4 == TrainConfig.__dataclass_fields__["lr"].default
    assert help_of(TrainConfig, "lr") == "AdamW learning rate. (default: 0.0001)"
    assert help_of(TrainConfig, "hflip") == "Random horizontal flip. (default: on)"
    assert help_of(TrainConfig, "lr", default=False) == "AdamW learning rate."
    undocumented = [f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("help")]
    assert undocumented == []


def test_the_quantizers_per_layer_warnings_go_to_the_debug_log(caplog):
    """onnxruntime's quantiser warns through the root logger once per depthwise bias; inside the
    INT8 step those lines are moved to gi-deploy's debug log (shown with -v)."""
    from gi_deploy.export.int8 import _quiet_quantizer

    record = logging.LogRecord(
        "root",
        logging.WARNING,
        "/site-packages/onnxruntime/quantization/qdq_quantizer.py",
        397,
        "Expected bias 'stages.0.conv_dw.bias' to be an initializer",
        None,
        None,
    )
    other = logging.LogRecord("root", logging.WARNING, "/somewhere/else.py", 1, "a real warning", None, None)
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="gi_deploy"), _quiet_quantizer():
        logging.getLogger().handle(record)
        logging.getLogger().handle(other)
    shown = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert (
        "gi_deploy.export.int8",
        logging.DEBUG,
        "onnxruntime quantizer: Expected bias 'stages.0.conv_dw.bias' to be an initializer",
    ) in shown
    assert ("root", logging.WARNING, "a real warning") in shown
    assert not any(level == logging.WARNING and "Expected bias" in msg for _, level, msg in shown)
