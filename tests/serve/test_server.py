"""``gi-deploy serve`` with real clients: tritonclient over HTTP and gRPC against a running server on
free loopback ports (KServe v2). Each test names the behaviour it guards; the reference answers are
``gi-deploy infer``'s own (runtime/infer.py, runtime/route.py) on the same files."""

from __future__ import annotations

import csv
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "pytriton", reason="needs the serve extra (nvidia-pytriton 0.7.0, numpy<2): run in .venv-serve, see README"
)
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TOL = 1e-5  # the CSV keeps 6 decimals (rounding <= 5e-7); the server runs the same model on the same pixels


def _bytes_tensor(mod, paths_or_bytes, name: str = "image"):
    data = [p if isinstance(p, bytes) else Path(p).read_bytes() for p in paths_or_bytes]
    arr = np.array([[d] for d in data], dtype=object)
    t = mod.InferInput(name, list(arr.shape), "BYTES")
    if mod is httpclient:
        t.set_data_from_numpy(arr, binary_data=True)
    else:
        t.set_data_from_numpy(arr)
    return t


def infer(url_or_client, model: str, paths, protocol: str = "http") -> dict[str, np.ndarray]:
    """POST ``paths`` (files or raw bytes) as one request to ``model``; every output as numpy."""
    mod = httpclient if protocol == "http" else grpcclient
    client = mod.InferenceServerClient(url_or_client) if isinstance(url_or_client, str) else url_or_client
    res = client.infer(model, [_bytes_tensor(mod, paths)])
    names = [
        o["name"]
        for o in (
            res.get_response()["outputs"]
            if mod is httpclient
            else [{"name": o.name} for o in res.get_response().outputs]
        )
    ]
    return {n: res.as_numpy(n) for n in names}


def _reference(deploy: Path, paths: list[Path], sources: list[str], tmp: Path) -> dict[tuple[str, str], dict]:
    """``gi-deploy infer`` on ``paths``: CSV rows by (resolved path, source)."""
    from gi_deploy.runtime.infer import InferConfig, infer_folder

    listing = tmp / f"{'-'.join(sources)}-inputs.txt"  # infer writes <out stem>.txt beside its CSV
    listing.write_text("\n".join(str(p) for p in paths) + "\n")
    cfg = InferConfig(
        inputs=listing,
        deploy_dir=deploy,
        sources=sources,
        out_csv=tmp / f"{'-'.join(sources)}.csv",
        workers=0,
        score=False,
    )
    r = infer_folder(cfg)
    with open(r.csv_path, newline="", encoding="utf-8") as f:  # file names repeat across class folders: full paths
        return {
            (str((Path(r.root) / row["path"]).resolve()), "auto" if sources == ["auto"] else row["source"]): row
            for row in csv.DictReader(f)
        }


def _classes(deploy: Path, source: str) -> list[str]:
    import json

    return json.loads((deploy / source / "manifest.json").read_text())["classes"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_answers_equal_infer_per_source(server, serve_deploy, serve_images, tmp_path, protocol):
    """Each source's model: the probabilities of a batch of JPEGs (one request over HTTP, one request per
    image over gRPC) equal `gi-deploy infer`'s within 1e-5, and the label is infer's prediction."""
    url = server.http if protocol == "http" else server.grpc
    for source in ("capsule", "endoscope"):
        paths = serve_images["capsule"] + serve_images["endoscope"]
        ref = _reference(serve_deploy, paths, [source], tmp_path)
        classes = _classes(serve_deploy, source)
        if protocol == "http":
            outs = [infer(url, source, paths, protocol)]
        else:
            outs = [infer(url, source, [p], protocol) for p in paths]
        probs = np.concatenate([o["probabilities"] for o in outs])
        labels = np.concatenate([o["label"] for o in outs]).reshape(-1)
        conf = np.concatenate([o["confidence"] for o in outs]).reshape(-1)
        assert probs.shape == (len(paths), len(classes))
        for p, row, label, c in zip(paths, probs, labels, conf):
            expected = ref[(str(p.resolve()), source)]
            want = np.array([float(expected[f"prob:{k}"]) for k in classes])
            np.testing.assert_allclose(row, want, atol=TOL, err_msg=f"{source} {p}")
            assert label.decode() == expected["predicted"]
            assert c == pytest.approx(float(expected["confidence"]), abs=TOL)


def test_auto_routes_and_refuses_out_of_distribution(server, serve_deploy, serve_images, tmp_path):
    """`auto` answers as `infer --source auto`: the same routed source, refusal and probabilities per
    image; frames of each source go to that source's model, and a frame no source covers is refused
    with a reason and no label."""
    paths = serve_images["capsule"] + serve_images["endoscope"] + serve_images["ood"]
    ref = _reference(serve_deploy, paths, ["auto"], tmp_path)
    for protocol, url in (("http", server.http), ("grpc", server.grpc)):
        out = infer(url, "auto", paths, protocol)
        all_classes = list(dict.fromkeys(_classes(serve_deploy, "capsule") + _classes(serve_deploy, "endoscope")))
        for i, p in enumerate(paths):
            want = ref[(str(p.resolve()), "auto")]
            assert out["source"][i, 0].decode() == want["source"], p
            assert bool(out["rejected"][i, 0]) == (want["rejected"] == "1"), p
            assert out["reason"][i, 0].decode() == want["reason"], p
            if want["rejected"] == "1":
                assert out["label"][i, 0] == b"" and not out["probabilities"][i].any()
                continue
            assert out["label"][i, 0].decode() == want["predicted"]
            got = dict(zip(all_classes, out["probabilities"][i]))
            for c in _classes(serve_deploy, want["source"]):
                assert got[c] == pytest.approx(float(want[f"prob:{c}"]), abs=TOL)
            assert out["router_confidence"][i, 0] == pytest.approx(float(want["router_confidence"]), abs=TOL)
    n = {s: len(serve_images[s]) for s in ("capsule", "endoscope")}
    routed = [s.decode() for s in out["source"][:, 0]]
    assert routed[: n["capsule"]].count("capsule") >= n["capsule"] - 1
    assert routed[n["capsule"] : n["capsule"] + n["endoscope"]].count("endoscope") >= n["endoscope"] - 1
    ood = out["rejected"][n["capsule"] + n["endoscope"] :, 0]
    assert ood.any(), "no out-of-distribution frame was refused"


def test_readiness_and_metadata_name_the_classes(server, serve_deploy):
    """Server and each model report ready (an unknown model does not); the metadata names the tensors and
    the model config carries the bundle's classes in order, over HTTP and gRPC."""
    import json

    h = httpclient.InferenceServerClient(server.http)
    g = grpcclient.InferenceServerClient(server.grpc)
    assert h.is_server_live() and h.is_server_ready() and g.is_server_ready()
    for model in ("capsule", "endoscope", "auto"):
        assert h.is_model_ready(model) and g.is_model_ready(model)
    assert not h.is_model_ready("no-such-model")
    for source in ("capsule", "endoscope"):
        meta = h.get_model_metadata(source)
        assert {i["name"] for i in meta["inputs"]} == {"image", "input"}
        assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label", "confidence"]
        cfg = h.get_model_config(source)
        assert json.loads(cfg["parameters"]["classes"]["string_value"]) == _classes(serve_deploy, source)
        gcfg = g.get_model_config(source, as_json=True)["config"]
        assert json.loads(gcfg["parameters"]["classes"]["string_value"]) == _classes(serve_deploy, source)
        assert cfg["max_batch_size"] == 32 and "dynamic_batching" in cfg
    auto = h.get_model_metadata("auto")
    assert "rejected" in [o["name"] for o in auto["outputs"]] and "reason" in [o["name"] for o in auto["outputs"]]


def _metric(text: str, name: str, model: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} for {model} in the metrics")


def test_burst_is_batched(server, serve_images):
    """16 concurrent clients x 50 requests: every one answered, and Prometheus shows fewer model
    executions than requests (the dynamic batcher merged them)."""
    import urllib.request

    metrics_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    before = urllib.request.urlopen(metrics_url).read().decode()
    body = [serve_images["capsule"][0].read_bytes()]
    errors, done = [], []

    def client():
        c = httpclient.InferenceServerClient(server.http)
        for _ in range(50):
            try:
                out = infer(c, "capsule", body)
                done.append(out["probabilities"].shape)
            except Exception as e:  # noqa: BLE001 (collected and asserted on below)
                errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(done) == 800
    time.sleep(1.5)  # Triton refreshes its counters on a timer
    after = urllib.request.urlopen(metrics_url).read().decode()
    requests = _metric(after, "nv_inference_request_success", "capsule") - _metric(
        before, "nv_inference_request_success", "capsule"
    )
    executions = _metric(after, "nv_inference_exec_count", "capsule") - _metric(
        before, "nv_inference_exec_count", "capsule"
    )
    assert requests == 800
    assert executions < requests, f"{executions} executions for {requests} requests: nothing was batched"


def _png_bomb() -> bytes:
    """A valid PNG header declaring a 30000 x 30000 canvas (900 MP) in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_each_get_an_error_and_the_server_keeps_serving(server, serve_images, protocol):
    """Not an image, a truncated JPEG, a decompression bomb, a 50 MB body, an unknown model, a wrong
    dtype, a wrong shape, an empty batch: each answered with an error naming the problem; a good request
    right after each is answered."""
    mod = httpclient if protocol == "http" else grpcclient
    client = mod.InferenceServerClient(server.http if protocol == "http" else server.grpc)
    good = serve_images["capsule"][0].read_bytes()

    def wrong_dtype():
        t = mod.InferInput("image", [1, 1], "FP32")
        t.set_data_from_numpy(np.zeros((1, 1), np.float32))
        return client.infer("capsule", [t])

    def wrong_shape():
        t = mod.InferInput("input", [1, 3, 5, 5], "FP32")
        t.set_data_from_numpy(np.zeros((1, 3, 5, 5), np.float32))
        return client.infer("capsule", [t])

    def empty_batch():
        t = mod.InferInput("image", [0, 1], "BYTES")
        t.set_data_from_numpy(np.zeros((0, 1), dtype=object))
        return client.infer("capsule", [t])

    cases = {
        "not an image": (lambda: infer(client, "capsule", [b"this is not an image at all"], protocol), "cannot read"),
        "truncated jpeg": (lambda: infer(client, "capsule", [good[: len(good) // 2]], protocol), "cannot read"),
        "bomb": (lambda: infer(client, "capsule", [_png_bomb()], protocol), "decompression bomb"),
        "50 MB": (lambda: infer(client, "capsule", [good[:2] + bytes(50 << 20)], protocol), ""),
        "unknown model": (lambda: infer(client, "no-such-model", [good], protocol), "no-such-model"),
        "wrong dtype": (wrong_dtype, ""),
        "wrong shape": (wrong_shape, ""),
        "empty batch": (empty_batch, ""),
        "bad image to auto": (lambda: infer(client, "auto", [b"GIF89a broken"], protocol), "cannot read"),
    }
    for name, (call, words) in cases.items():
        with pytest.raises(InferenceServerException) as e:
            call()
        assert words in str(e.value), f"{name}: {e.value}"
        out = infer(client, "capsule", [good], protocol)  # the server is still serving
        assert out["probabilities"].shape[0] == 1, name


def test_preprocessed_input_equals_the_image(server, serve_deploy, serve_images):
    """A client that resizes itself sends the bundle's float32 (3, H, W) input: same answer as the bytes."""
    import json

    from gi_deploy.core.preprocess import PreprocessSpec, load_input

    spec = PreprocessSpec.from_dict(json.loads((serve_deploy / "capsule" / "manifest.json").read_text())["preprocess"])
    x = np.stack([load_input(p, spec) for p in serve_images["capsule"]])
    client = httpclient.InferenceServerClient(server.http)
    t = httpclient.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x, binary_data=True)
    got = client.infer("capsule", [t]).as_numpy("probabilities")
    want = infer(client, "capsule", serve_images["capsule"])["probabilities"]
    np.testing.assert_allclose(got, want, atol=TOL)


def _listening(port: int) -> list[str]:
    """Local addresses of the sockets listening on ``port`` (IPv4 and IPv6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                found.append(addr)
    return found


def test_binds_loopback_by_default(server):
    """Every endpoint (HTTP, gRPC, metrics) listens on 127.0.0.1 only, never on every interface."""
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        addrs = _listening(port)
        assert addrs, f"nothing listens on {port}"
        # 127.0.0.1, as IPv4 or IPv4-mapped IPv6 (::ffff:127.0.0.1); 0.0.0.0 or :: would be every interface
        assert set(addrs) <= {"0100007F", "0000000000000000FFFF00000100007F"}, f"port {port} listens on {addrs}"


def test_sigterm_drains_in_flight_requests_and_exits_0(serve_deploy, serve_images, start_server, tmp_path):
    """SIGTERM as the first of 8 concurrent requests is answered: the 7 others, queued or running, are
    still answered (after the signal), and the process exits 0."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()  # a large noisy frame: slow to decode, so the requests queue up behind each other
    Image.fromarray(rng.integers(0, 255, (1072, 1920, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    body = [buf.getvalue()] * 4
    s = start_server(
        serve_deploy, "--source", "capsule", "--max-batch", "4", "--max-queue-delay-ms", "0", "--threads", "1"
    )
    s.wait_ready(["capsule"])
    done, first = [], threading.Event()

    def client():
        try:
            out = infer(s.http, "capsule", body)
            done.append((time.perf_counter(), out["probabilities"].shape[0]))
        except Exception as e:  # noqa: BLE001 (asserted below)
            done.append((time.perf_counter(), repr(e)))
        first.set()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    assert first.wait(120)
    signalled = time.perf_counter()
    s.proc.terminate()
    for t in threads:
        t.join(120)
    assert [n for _, n in done] == [len(body)] * 8, done  # every request answered, none dropped
    assert sum(t > signalled for t, _ in done) >= 1, "nothing was in flight at SIGTERM"
    assert s.proc.wait(60) == 0, s.output()
    assert "stopped" in s.output()
