"""The served models' callables in-process (serve/models.py, no server, no PyTriton): the requests a
dynamic batch hands over become the runtime's answers, and bad requests raise naming the reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gi_deploy.errors import DataError


class Req(dict):
    """What PyTriton hands a callable: a mapping of input name -> array with a batch dimension."""


def _image(paths):
    return Req(image=np.array([[p.read_bytes()] for p in paths], dtype=object))


@pytest.fixture(scope="module")
def capsule(serve_deploy):
    from gi_deploy.serve.models import open_served

    return open_served(serve_deploy, "capsule", threads=1)


def test_a_dynamic_batch_answers_each_request_as_infer_does(capsule, serve_deploy, serve_images):
    """Three requests of 1, 2 and 1 images in one execution: each gets its own rows, equal to the
    bundle's own classification of the same file (decode + softmax of the runtime)."""
    from gi_deploy.core.metrics import softmax
    from gi_deploy.runtime.decode.cpu import decode_batch

    paths = serve_images["capsule"][:2] + serve_images["endoscope"][:2]
    out = capsule([_image(paths[:1]), _image(paths[1:3]), _image(paths[3:])])
    assert [len(o["probabilities"]) for o in out] == [1, 2, 1]
    b = capsule.strategy.bundles["capsule"]
    want = softmax(b.predict_logits(decode_batch(paths, (b.preprocess,)).inputs[0]))
    got = np.concatenate([o["probabilities"] for o in out])
    np.testing.assert_allclose(got, want, atol=1e-6)
    labels = [x.decode() for o in out for x in o["label"][:, 0]]
    assert labels == [b.classes[i] for i in want.argmax(axis=1)]
    assert json.loads(capsule.parameters["classes"]) == b.classes


@pytest.mark.parametrize(
    "request_, words",
    [
        (Req(image=np.array([[b"not an image"]], dtype=object)), "cannot read image <12 bytes>"),
        (Req(image=np.zeros((0, 1), dtype=object)), "empty"),
        (Req(), "exactly one of the inputs"),
        (Req(image=np.array([[b"\xff\xd8" + bytes(3 << 20)]], dtype=object)), "over the"),
    ],
)
def test_bad_requests_raise_naming_the_reason(serve_deploy, request_, words):
    from gi_deploy.serve.models import open_served

    model = open_served(serve_deploy, "capsule", threads=1, max_image_bytes=2 << 20)
    with pytest.raises(DataError, match=words):
        model([request_])


def test_auto_refuses_a_frame_no_source_covers(serve_deploy, serve_images):
    """`auto`: source frames routed to their source with a label; an OOD frame refused, no label, a reason."""
    from gi_deploy.serve.models import open_served

    auto = open_served(serve_deploy, "auto", threads=1)
    out = auto([_image(serve_images["capsule"] + serve_images["endoscope"] + serve_images["ood"])])[0]
    n_c, n_e = len(serve_images["capsule"]), len(serve_images["endoscope"])
    sources = [s.decode() for s in out["source"][:, 0]]
    assert sources[:n_c].count("capsule") >= n_c - 1 and sources[n_c : n_c + n_e].count("endoscope") >= n_e - 1
    refused = out["rejected"][:, 0]
    assert refused[n_c + n_e :].any()
    for i in np.flatnonzero(refused):
        assert out["label"][i, 0] == b"" and out["reason"][i, 0] and not out["probabilities"][i].any()


def test_a_folder_without_bundles_is_refused_before_any_port_opens(tmp_path):
    """`serve` on a folder with no bundle names it and the command that makes bundles (no empty server)."""
    from gi_deploy.errors import BundleError
    from gi_deploy.serve.models import model_names

    with pytest.raises(BundleError, match="gi-deploy export"):
        model_names(tmp_path, None)
