"""The benchmark's inputs: its options are checked before anything runs, and its synthetic frames
are real JPEGs of an endoscope's size (the CLI test in tests/test_cli_runtime.py runs the table)."""

import pytest
from PIL import Image

from gi_deploy.errors import ConfigError
from gi_deploy.runtime.benchmark import BenchmarkConfig, synthetic_frames


@pytest.mark.parametrize(
    "bad",
    [dict(batch_size=0), dict(workers=-1), dict(threads=0), dict(n_images=40, batch_size=32), dict(latency_runs=2)],
)
def test_bad_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        BenchmarkConfig(**bad)


def test_synthetic_frames_are_endoscope_sized_jpegs(tmp_path):
    paths = synthetic_frames(tmp_path, n=3)
    assert len(paths) == 3
    for p in paths:
        with Image.open(p) as img:
            assert img.format == "JPEG" and img.size == (720, 576)
            # not flat: a flat frame would decode unrealistically fast
            lo, hi = img.convert("L").getextrema()
            assert hi - lo > 50
