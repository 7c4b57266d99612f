"""Synthetic endoscopy-like images with a visible domain shift between two sources.

Not clinical data: the images exist to exercise the pipeline. Four findings are drawn as
distinct patterns on a mucosa-like texture; the two sources differ the way capsule and
conventional endoscopy do: a round field of view, bile tint, low resolution and vignetting
("capsule") versus a wide rectangular view, white light, vessels and specular glare
("endoscope"). And, as with real devices, a finding does not look the same through both: the
endoscope shows a polyp as a pale raised lesion with a red rim and an ulcer as a dark red crater
(the capsule's polyp look), so a model trained on one source is wrong on the other's polyps and
ulcers: the seed paper's Table 1 in miniature.

A third, findings-free source (``pretext``) gives the demo's base something to learn that is
neither source's findings: plain mucosa whose folds run in one of four directions.

Near out-of-distribution sets (``write_near_ood``), the hard cases refusal must face, unlike the blank and
pattern frames of ``write_ood``: a third device close to the two (the endoscope's anatomy and findings through
other optics and light), frames of the right devices spoiled by heavy blur, bubbles or over-exposure, and the
pretext frames (mucosa, but no source's device).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

CLASSES = ("normal", "polyp", "ulcer", "bleeding")
SOURCES = ("capsule", "endoscope")
SPLIT_SIZES = {"train": 60, "val": 15, "test": 30}
# How the endoscope draws a finding (the capsule draws each as itself): the same pathology looks
# different through another device.
DEVICE_LOOK = {"polyp": "ulcer", "ulcer": "polyp"}
PRETEXT = "pretext"
PRETEXT_CLASSES = ("folds_0", "folds_45", "folds_90", "folds_135")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], (size, size)."""
    small = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def render(finding: str, source: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One uint8 RGB image (size, size, 3) of ``finding`` as seen by ``source``."""
    if finding not in CLASSES or source not in SOURCES:
        raise ValueError(f"unknown finding/source {finding!r}/{source!r}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    capsule = source == "capsule"
    tissue = np.array([0.80, 0.48, 0.36] if capsule else [0.86, 0.52, 0.55], dtype=np.float32)
    angle = rng.uniform(0, np.pi)
    folds = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * rng.uniform(6, 12) * np.pi)
    texture = 0.75 + 0.15 * folds + 0.2 * _smooth_noise(rng, size, 6)
    img = texture[..., None] * tissue
    if not capsule:  # vessels: thin dark lines of a second, finer noise field
        vessels = np.abs(_smooth_noise(rng, size, 12) - 0.5) < 0.025
        img[vessels] *= np.array([0.75, 0.55, 0.6], dtype=np.float32)
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    drawn = finding if capsule else DEVICE_LOOK.get(finding, finding)
    if drawn == "polyp":
        r = rng.uniform(0.12, 0.2)
        d = _blob(yy, xx, cy, cx, r, r * rng.uniform(0.8, 1.2))
        shade = np.clip(1.0 - d, 0, 1)[..., None]
        img = np.where(d[..., None] < 1, img * 0.6 + shade * np.array([0.55, 0.28, 0.25]), img)
    elif drawn == "ulcer":
        r = rng.uniform(0.1, 0.16)
        d = _blob(yy, xx, cy, cx, r, r * rng.uniform(0.7, 1.4))
        img = np.where((d > 1)[..., None] & (d < 1.8)[..., None], img * np.array([1.0, 0.55, 0.5]), img)
        img = np.where(d[..., None] <= 1, np.array([0.93, 0.9, 0.72], dtype=np.float32), img)
    elif drawn == "bleeding":
        for _ in range(rng.integers(3, 7)):
            by, bx = rng.uniform(0.15, 0.85, size=2)
            r = rng.uniform(0.04, 0.1)
            d = _blob(yy, xx, by, bx, r * rng.uniform(1, 3), r)
            img = np.where(d[..., None] < 1, np.array([0.45, 0.04, 0.05], dtype=np.float32), img)
    if capsule:
        img = img * np.array([1.0, 1.02, 0.75], dtype=np.float32)  # bile tint
        r2 = (yy - 0.5) ** 2 + (xx - 0.5) ** 2
        img = img * np.clip(1.1 - 1.6 * r2, 0, 1)[..., None]  # vignetting
        img[r2 > 0.23] = 0.0  # round field of view
    else:
        for _ in range(rng.integers(2, 5)):  # specular glare
            gy, gx = rng.uniform(0.1, 0.9, size=2)
            img[_blob(yy, xx, gy, gx, 0.025, 0.04) < 1] = 1.0
        img[:, : size // 12] = 0.0  # black side bands of a wide sensor
        img[:, -(size // 12) :] = 0.0
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    out = Image.fromarray((img * 255).astype(np.uint8))
    if capsule:  # capsule cameras resolve less: down- and up-sample
        out = out.resize((size // 2, size // 2), Image.Resampling.BILINEAR).resize(
            (size, size), Image.Resampling.BILINEAR
        )
    return np.asarray(out)


def write_source(
    root: Path, source: str, seed: int = 0, size: int = 64, split_sizes: dict[str, int] = SPLIT_SIZES
) -> Path:
    """Write ``root/<source>/{train,val,test}/<class>/<n>.jpg``; returns the source folder."""
    rng = np.random.default_rng([seed, SOURCES.index(source)])
    out = Path(root) / source
    for split, n in split_sizes.items():
        for finding in CLASSES:
            folder = out / split / finding
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(render(finding, source, rng, size)).save(
                    folder / f"{source}_{split}_{i:04d}.jpg", quality=92
                )
    return out


def render_pretext(direction: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One uint8 RGB image (size, size, 3) of findings-free mucosa whose folds run in
    ``direction`` (one of ``PRETEXT_CLASSES``), under a neutral light, square view."""
    if direction not in PRETEXT_CLASSES:
        raise ValueError(f"unknown fold direction {direction!r}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = np.deg2rad(int(direction.split("_")[1]) + rng.uniform(-12, 12))
    folds = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * rng.uniform(5, 10) * np.pi)
    tissue = np.array([0.83, 0.5, 0.45], dtype=np.float32) * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    img = (0.7 + 0.25 * folds + 0.15 * _smooth_noise(rng, size, 6))[..., None] * tissue
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    return (img * 255).astype(np.uint8)


def write_pretext(root: Path, seed: int = 0, size: int = 64, split_sizes: dict[str, int] = SPLIT_SIZES) -> Path:
    """Write ``root/pretext/{train,val}/<direction>/<n>.jpg`` (no test split: only the base trains
    on it); returns the folder."""
    rng = np.random.default_rng([seed, len(SOURCES)])
    out = Path(root) / PRETEXT
    for split in ("train", "val"):
        for direction in PRETEXT_CLASSES:
            folder = out / split / direction
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(split_sizes[split]):
                Image.fromarray(render_pretext(direction, rng, size)).save(
                    folder / f"pretext_{split}_{i:04d}.jpg", quality=92
                )
    return out


def write_ood(folder: Path, size: int = 64, n: int = 8, seed: int = 0) -> Path:
    """Frames no source covers, ``4 * n`` of them: blank (black, grey, white) and saturated frames,
    and non-endoscopy images (smooth colour fields of any hue, stripes and checkerboards)."""
    rng = np.random.default_rng([seed, 99])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        level = (0, 128, 255)[i % 3]
        blank = np.full((size, size, 3), level, np.uint8)
        saturated = np.zeros((size, size, 3), np.uint8)
        saturated[..., i % 3] = 255
        field = np.asarray(
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(
                (size, size), Image.Resampling.BICUBIC
            )
        )
        cell = int(rng.integers(2, 12))
        pattern = np.where(
            (((yy // cell) + (xx // cell * (i % 2))) % 2 == 0)[..., None],
            rng.integers(0, 256, 3),
            rng.integers(0, 256, 3),
        ).astype(np.uint8)
        for kind, a in (("blank", blank), ("saturated", saturated), ("colour_field", field), ("pattern", pattern)):
            Image.fromarray(a).save(folder / f"{kind}_{i:02d}.png")
    return folder


# --- a synthetic capsule study (triage) ---------------------------------------------------------------

STUDY_SECTIONS = ("stomach", "small bowel", "colon")
# Each section's light through the capsule: the stomach a little pinker, the small bowel as the
# capsule source's frames (bile), the colon a little darker. Barely: the demo's capsule model was
# trained on small-bowel-like frames only, and a stronger tint (15-30%) made it read the stomach and
# colon as bleeding (measured: 523 of 540 such frames).
SECTION_TINT = {"stomach": (1.02, 0.98, 1.0), "small bowel": (1.0, 1.0, 1.0), "colon": (0.97, 0.96, 0.94)}
# Kvasir-Capsule's landmark labels at the two section changes
LANDMARK_LABELS = ("Pylorus", "Ileocecal valve")


@dataclass
class CapsuleStudyPlan:
    """What a synthetic study holds, frame by frame: ``finding[i]`` the class frame i shows,
    ``section[i]`` its section index, ``copy_of[i]`` the earlier frame it repeats (the capsule
    stalled: a near-duplicate) or -1; ``runs``: (finding, first, last) injected findings;
    ``changes``: the first small-bowel and first colon frames."""

    fps: float
    finding: list[str]
    section: np.ndarray
    copy_of: np.ndarray
    runs: list[tuple[str, int, int]]
    changes: tuple[int, int]

    @property
    def n_frames(self) -> int:
        return len(self.finding)


def plan_capsule_study(
    n_frames: int,
    fps: float,
    seed: int = 0,
    n_runs: int = 6,
    run_frames: tuple[int, int] = (8, 16),
    stall_every: int = 40,
    stall_frames: int = 4,
) -> CapsuleStudyPlan:
    """A study of ``n_frames`` at ``fps``: sections at 15% and 70% of the frames, ``n_runs``
    finding runs (polyp, ulcer, bleeding in turn; ``run_frames`` long, apart from each other and from
    the section changes), and a stall every ``stall_every`` frames where the capsule repeats one
    frame ``stall_frames`` times (inside runs too: near-duplicates the review list must drop)."""
    rng = np.random.default_rng([seed, 7])
    changes = (int(0.15 * n_frames), int(0.70 * n_frames))
    section = np.zeros(n_frames, np.int8)
    section[changes[0] :] = 1
    section[changes[1] :] = 2
    finding = ["normal"] * n_frames
    runs: list[tuple[str, int, int]] = []
    slots = np.linspace(0.05 * n_frames, 0.95 * n_frames, n_runs + 2)[1:-1]
    for i, centre in enumerate(slots):
        length = int(rng.integers(run_frames[0], run_frames[1] + 1))
        a = int(centre + rng.integers(-length, length + 1))
        a = min(max(a, 1), n_frames - length - 1)
        cls = CLASSES[1 + i % (len(CLASSES) - 1)]
        runs.append((cls, a, a + length - 1))
        finding[a : a + length] = [cls] * length
    copy_of = np.full(n_frames, -1, np.int64)
    for s in range(stall_every // 2, n_frames - stall_frames, stall_every):
        for k in range(1, stall_frames):
            if finding[s + k] == finding[s]:
                copy_of[s + k] = s
    return CapsuleStudyPlan(fps, finding, section, copy_of, runs, changes)


def render_capsule_study(plan: CapsuleStudyPlan, size: int = 64, seed: int = 0) -> Iterator[np.ndarray]:
    """The study's frames, uint8 (size, size, 3), one at a time (a long study never sits in memory):
    the capsule renderer's image of each frame's finding under its section's light; a stalled
    frame repeats the frame it copies with a little sensor noise."""
    rng = np.random.default_rng([seed, 8])
    last: dict[int, np.ndarray] = {}
    for i in range(plan.n_frames):
        if plan.copy_of[i] >= 0:
            base = last[int(plan.copy_of[i])]
            noisy = base.astype(np.int16) + rng.integers(-2, 3, base.shape)
            yield np.clip(noisy, 0, 255).astype(np.uint8)
            continue
        img = render(plan.finding[i], "capsule", rng, size).astype(np.float32)
        img *= np.asarray(SECTION_TINT[STUDY_SECTIONS[plan.section[i]]], np.float32)
        frame = np.clip(img, 0, 255).astype(np.uint8)
        if i + 1 < plan.n_frames and plan.copy_of[i + 1] == i:
            last = {i: frame}
        yield frame


def write_capsule_labels(plan: CapsuleStudyPlan, path: Path, video_id: str, normal_every: int = 25) -> Path:
    """The study's labels as Kvasir-Capsule's ``metadata.csv`` (``;``-separated): every frame of
    every run, the first frame of each section change under its landmark label, and every
    ``normal_every``-th normal frame (most frames stay unlabelled, as in the real release)."""
    rows = []
    for cls, a, b in plan.runs:
        rows += [(f, cls) for f in range(a, b + 1)]
    rows += [(c, label) for c, label in zip(plan.changes, LANDMARK_LABELS)]
    rows += [
        (f, "normal")
        for f in range(0, plan.n_frames, normal_every)
        if plan.finding[f] == "normal" and f not in plan.changes
    ]
    with open(path, "w", encoding="utf-8") as out:
        out.write("filename;video_id;frame_number;finding_category;finding_class\n")
        for f, cls in sorted(rows):
            out.write(f"{video_id}_{f}.jpg;{video_id};{f};{'Anatomy' if cls in LANDMARK_LABELS else 'Luminal'};{cls}\n")
    return Path(path)


NEAR_OOD = ("third_device", "blur", "bubbles", "overexposed", "pretext")


def _third_device(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An endoscope frame (uint8 (H, W, 3)) as a third device would show it: a narrow-band-like light (red
    down, blue up), a softer lens, and an octagonal field of view (corners cut) instead of side bands."""
    size = a.shape[0]
    img = a.astype(np.float32) / 255 * np.array([0.8, 1.0, 1.12], dtype=np.float32) * rng.uniform(0.95, 1.05)
    img = (
        np.asarray(
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size / 80)),
            dtype=np.float32,
        )
        / 255
    )
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img[np.abs(yy - 0.5) + np.abs(xx - 0.5) > 0.72] = 0.0  # the corners of an octagonal view
    return (img * 255).astype(np.uint8)


def _bubbles(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Air bubbles over a frame: 12-30 translucent discs with bright rims and a specular dot."""
    size = a.shape[0]
    img = a.astype(np.float32) / 255
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for _ in range(rng.integers(12, 31)):
        cy, cx = rng.uniform(0.1, 0.9, size=2)
        r = rng.uniform(0.03, 0.1)
        d = _blob(yy, xx, cy, cx, r, r)
        inside, rim = d < 0.8, (d >= 0.8) & (d < 1.0)
        img[inside] = img[inside] * 0.7 + 0.3 * np.array([0.95, 0.93, 0.85], dtype=np.float32)
        img[rim] = 0.97
        img[_blob(yy, xx, cy - r / 3, cx - r / 3, r / 5, r / 5) < 1] = 1.0
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def render_near_ood(kind: str, rng: np.random.Generator, size: int = 64, index: int = 0) -> np.ndarray:
    """One uint8 RGB image (size, size, 3) of near-OOD ``kind`` (one of ``NEAR_OOD``). The spoiled kinds
    (blur, bubbles, overexposed) alternate the sources' devices with ``index``. Raises ValueError for an
    unknown kind."""
    if kind not in NEAR_OOD:
        raise ValueError(f"unknown near-OOD kind {kind!r}; kinds are {', '.join(NEAR_OOD)}")
    finding = CLASSES[index % len(CLASSES)]
    if kind == "pretext":
        return render_pretext(PRETEXT_CLASSES[index % len(PRETEXT_CLASSES)], rng, size)
    if kind == "third_device":
        return _third_device(render(finding, "endoscope", rng, size), rng)
    a = render(finding, SOURCES[index % len(SOURCES)], rng, size)
    if kind == "blur":  # far out of focus, or a lens smeared with fluid
        return np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(size / 14)))
    if kind == "bubbles":
        return _bubbles(a, rng)
    # over-exposed: the light's gain far too high, most of the frame blown out
    return (np.clip(a.astype(np.float32) * rng.uniform(2.2, 3.0), 0, 255)).astype(np.uint8)


def write_near_ood(
    root: Path, size: int = 64, n: int = 32, seed: int = 0, kinds: tuple[str, ...] = NEAR_OOD
) -> dict[str, Path]:
    """Write ``root/<kind>/<kind>_<n>.jpg`` (JPEG quality 92, as the sources), ``n`` images per kind;
    returns {kind: folder}. Seeded apart from the sources' and the pretext's images."""
    out = {}
    for k, kind in enumerate(kinds):
        rng = np.random.default_rng([seed, 200 + NEAR_OOD.index(kind)])
        folder = Path(root) / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(render_near_ood(kind, rng, size, i)).save(folder / f"{kind}_{i:03d}.jpg", quality=92)
        out[kind] = folder
    return out
