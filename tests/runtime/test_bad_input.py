"""Planted bad and odd inputs: every broken file becomes an error row naming it and the reason, the
run goes on; every odd-but-valid file is decoded to the right pixels and classified."""

import csv
import io
import os
import signal
import sys

import numpy as np
import pytest
from conftest import permissions_enforced
from PIL import Image

from gi_deploy.core.preprocess import BACKGROUND, MAX_PIXELS, list_images, load_rgb
from gi_deploy.errors import DataError
from gi_deploy.runtime.infer import InferConfig, infer_folder


def _picture(w: int = 40, h: int = 24) -> Image.Image:
    """An asymmetric RGB picture: any rotation or channel mix-up changes its pixels."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    a[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    a[: h // 3, : w // 4, 2] = 255
    return Image.fromarray(a, "RGB")


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def plant_bad(folder):
    """Broken files, each of a kind the runtime must survive; returns {relative path: reason regex}."""
    folder.mkdir(parents=True, exist_ok=True)
    good = _jpeg_bytes(_picture())
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "corrupt.jpg").write_bytes(good[:20] + bytes(range(256)) * 4)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is a text file with an image extension\n")
    side = int((MAX_PIXELS * 1.2) ** 0.5)  # a 1-bit canvas over our limit (below Pillow's): a few kB on disk
    Image.new("1", (side, side)).save(folder / "bomb.png", optimize=True)
    os.symlink(folder / "loop_b.jpg", folder / "loop_a.jpg")
    os.symlink(folder / "loop_a.jpg", folder / "loop_b.jpg")
    return {
        "truncated.jpg": "truncated|cannot",
        "corrupt.jpg": "cannot read image",
        "empty.jpg": "cannot identify",
        "notes.png": "cannot identify",
        "bomb.png": "decompression bomb",
        "loop_a.jpg": "symbolic links",
        "loop_b.jpg": "symbolic links",
    }


def plant_odd(folder):
    """Odd but valid files; returns {relative path: expected RGB array}."""
    folder.mkdir(parents=True, exist_ok=True)
    pic = _picture()
    rgb = np.asarray(pic)
    expected = {}
    pic.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = rgb
    gray16 = np.asarray(pic.convert("L"), np.uint16) * 257
    Image.fromarray(gray16).save(folder / "gray16.png")  # 16-bit grayscale
    expected["gray16.png"] = np.repeat(np.asarray(pic.convert("L"))[..., None], 3, 2)
    pic.convert("L").save(folder / "gray.png")
    expected["gray.png"] = np.repeat(np.asarray(pic.convert("L"))[..., None], 3, 2)
    pal = pic.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.save(folder / "palette.png")
    expected["palette.png"] = np.asarray(pal.convert("RGB"))
    rgba = pic.convert("RGBA")
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :10] = 0  # the left strip is transparent: it must come out as the defined background
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(folder / "rgba.png")
    exp = rgb.copy()
    exp[:, :10] = BACKGROUND
    expected["rgba.png"] = exp
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels are the upright image rotated 90 degrees counter-clockwise
    (folder / "exif rotated.jpg").write_bytes(_jpeg_bytes(pic.transpose(Image.Transpose.ROTATE_90), exif=exif))
    expected["exif rotated.jpg"] = rgb
    (folder / "ünïcødé näme (1).jpg").write_bytes(_jpeg_bytes(pic))
    expected["ünïcødé näme (1).jpg"] = rgb
    return expected


@pytest.fixture()
def planted(tmp_path):
    bad = plant_bad(tmp_path / "polyp")
    odd = plant_odd(tmp_path / "ulcer")
    (tmp_path / "ulcer" / "sub").mkdir()
    os.symlink(tmp_path, tmp_path / "ulcer" / "sub" / "loop")  # a directory symlink loop
    return tmp_path, bad, odd


def test_odd_but_valid_files_decode_to_the_right_pixels(planted):
    root, _, odd = planted
    for name, expected in odd.items():
        got = np.asarray(load_rgb(root / "ulcer" / name))
        assert got.shape == expected.shape and got.dtype == np.uint8, name
        error = np.abs(got.astype(int) - expected)
        if name.endswith(".jpg"):  # lossy: small on average (a wrong rotation or channel order is > 50)
            assert error.mean() < 4, (name, error.mean())
        else:
            assert error.max() <= 1, (name, error.max())


def test_each_broken_file_raises_a_data_error_naming_it(planted):
    root, bad, _ = planted
    for name, reason in bad.items():
        with pytest.raises(DataError, match=reason) as e:
            load_rgb(root / "polyp" / name)
        assert name in str(e.value)


@pytest.mark.skipif(sys.platform == "win32", reason="chmod cannot make a file unreadable on Windows")
def test_an_unreadable_file_is_an_error(tmp_path):
    f = tmp_path / "locked.jpg"
    f.write_bytes(_jpeg_bytes(_picture()))
    f.chmod(0)
    with permissions_enforced(), pytest.raises(DataError, match="locked.jpg.*Permission denied"):
        load_rgb(f)  # as root too (CI): without its permission bypass, root cannot open it either


def test_listing_lists_broken_links_and_does_not_follow_a_loop(planted):
    root, bad, odd = planted
    signal.alarm(20)  # a recursion into the loop would hang: fail instead
    try:
        found = {p.relative_to(root).as_posix() for p in list_images(root)}
    finally:
        signal.alarm(0)
    assert found == {f"polyp/{n}" for n in bad} | {f"ulcer/{n}" for n in odd}


def test_a_planted_folder_runs_to_completion_with_an_error_row_per_broken_file(planted, tiny_deploy, tmp_path):
    root, bad, odd = planted
    out = tmp_path.with_name(tmp_path.name + "-pred.csv")  # outside the folder classified
    r = infer_folder(InferConfig(inputs=root, deploy_dir=tiny_deploy, out_csv=out, batch_size=4))
    with open(out, newline="", encoding="utf-8") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    assert set(rows) == {f"polyp/{n}" for n in bad} | {f"ulcer/{n}" for n in odd}
    for name in bad:
        row = rows[f"polyp/{name}"]
        assert row["predicted"] == "" and name in row["error"], row
    for name in odd:
        row = rows[f"ulcer/{name}"]
        assert row["error"] == "" and row["predicted"] and 0 < float(row["confidence"]) <= 1, row
    assert r.n_errors == len(bad) and r.n_images == len(bad) + len(odd)
    assert r.sources["capsule"].metrics["n"] == len(odd) and r.sources["capsule"].metrics["n_errors"] == len(
        bad
    )  # scored on what could be read


def test_a_canvas_over_pillows_own_limit_is_a_data_error_not_a_warning(tmp_path):
    Image.new("1", (10_000, 10_000)).save(tmp_path / "huge.png", optimize=True)  # 100 MP, ~12 kB
    with pytest.raises(DataError, match="huge.png.*decompression bomb"):
        load_rgb(tmp_path / "huge.png")
