"""From the job's per-frame predictions to a study per video: smoothed scores, segments, sections,
the quality track and the review list (near-duplicates removed, top-k per finding, the budget).
Pure numpy over arrays; the run (triage/run.py) feeds it and writes what it returns."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gi_deploy.errors import DataError
from gi_deploy.triage.config import TriageConfig
from gi_deploy.triage.review import flagged_positions, quality_track, remove_near_duplicates, review_budget, top_frames
from gi_deploy.triage.roles import SECTIONS, ClassRoles
from gi_deploy.triage.sections import Sections, find_sections
from gi_deploy.triage.temporal import Segment, find_segments, smooth

PROB_PREFIX = "prob:"  # runtime/evaluate.py's prefix of the CSV's probability columns


@dataclass
class FrameTable:
    """One video's frames in time order: ``items`` the CSV paths, ``frames`` (N,) int64,
    ``times`` (N,) float64 seconds, ``probs`` (N, C) float32 in ``classes`` order (zeros where
    the frame was refused or unreadable), ``refused`` / ``unreadable`` (N,) bool."""

    video: str
    items: list[str]
    frames: np.ndarray
    times: np.ndarray
    probs: np.ndarray
    refused: np.ndarray
    unreadable: np.ndarray


def read_predictions(csv_path: Path, source: str, classes: list[str]) -> list[FrameTable]:
    """The job's CSV as one :class:`FrameTable` per video (video id order). Rows answered by another
    source (``--source auto`` routed the frame elsewhere) or refused count as refused. Raises
    DataError when the CSV lacks the frame columns or a class's probability column."""
    by_video: dict[str, list] = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        need = {"video", "frame", "time_s", *(PROB_PREFIX + c for c in classes)}
        if need - cols:
            raise DataError(
                f"{csv_path} lacks the columns {', '.join(sorted(need - cols))}: not a triage job's "
                "predictions (or another model's); use another --out"
            )
        for r in reader:
            bad = bool(r.get("error"))
            refused = not bad and (
                r.get("rejected", "").lower() in ("1", "true")
                or r.get("source") != source
                or not r.get(PROB_PREFIX + classes[0])
            )
            p = [0.0] * len(classes) if bad or refused else [float(r[PROB_PREFIX + c]) for c in classes]
            by_video.setdefault(r["video"], []).append(
                (int(r["frame"]), float(r["time_s"]), r["path"], p, refused, bad)
            )
    tables = []
    for video in sorted(by_video):
        rows = sorted(by_video[video], key=lambda t: t[0])
        tables.append(
            FrameTable(
                video,
                [t[2] for t in rows],
                np.array([t[0] for t in rows], np.int64),
                np.array([t[1] for t in rows], np.float64),
                np.array([t[3] for t in rows], np.float32).reshape(len(rows), len(classes)),
                np.array([t[4] for t in rows], bool),
                np.array([t[5] for t in rows], bool),
            )
        )
    return tables


@dataclass
class VideoStudy:
    """A video's study: ``smoothed`` (N, C) float32, ``segments`` in time order, ``sections`` (the
    change points), ``flagged`` (N,) bool frames inside a segment, ``quality`` the track's counts
    and ``poor`` (N,) bool; the review list (``review``: positions after near-duplicate removal,
    ``top``: finding -> its top-k) and ``budget`` once :func:`select_review` ran."""

    table: FrameTable
    roles: ClassRoles
    smoothed: np.ndarray
    segments: list[Segment]
    sections: Sections
    flagged: np.ndarray
    quality: dict
    review: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    top: dict[str, list[dict]] = field(default_factory=dict)
    budget: dict = field(default_factory=dict)

    @property
    def video(self) -> str:
        return self.table.video

    def finding_scores(self) -> np.ndarray:
        """(N, F) the smoothed scores of the findings, in roles.findings order."""
        return self.smoothed[:, list(self.roles.findings)]


def analyse(table: FrameTable, roles: ClassRoles, cfg: TriageConfig) -> VideoStudy:
    """Smooth, find segments and sections, and the quality track of one video."""
    smoothed = smooth(table.probs, cfg.smoothing, cfg.window)
    findings = roles.names("findings")
    segments = find_segments(
        table.video,
        smoothed[:, list(roles.findings)],
        findings,
        table.frames,
        table.times,
        cfg.high,
        cfg.low,
        cfg.min_frames,
    )
    sections = find_sections(smoothed[:, list(roles.landmarks)], cfg.landmark_evidence)
    quality = quality_track(table.probs, roles.quality, table.refused | table.unreadable)
    flagged = flagged_positions(segments, len(table.frames))
    return VideoStudy(table, roles, smoothed, segments, sections, flagged, quality)


def select_review(study: VideoStudy, hashes: np.ndarray, cfg: TriageConfig) -> None:
    """The review list of ``study``: its flagged frames, best score first, near-duplicates removed
    (``hashes`` (N, 32) uint8 dHashes by position; only flagged positions are read), then the top-k
    frames of each finding and the budget. Fills ``review``, ``top`` and ``budget``."""
    scores = study.finding_scores()
    best = scores.max(axis=1) if scores.size else np.zeros(len(study.flagged))
    flagged = np.flatnonzero(study.flagged)
    order = flagged[np.argsort(-best[flagged], kind="stable")]
    study.review = remove_near_duplicates(order, hashes, cfg.duplicate_bits)
    kept = set(study.review.tolist())
    study.top = {}
    for j, name in enumerate(study.roles.names("findings")):
        top = top_frames(study.segments, name, scores[:, j], kept, cfg.top_k)
        if top:
            study.top[name] = top
    t = study.table.times
    study.budget = review_budget(
        len(t), float(t[-1] - t[0]) if len(t) else 0.0, int(study.flagged.sum()), len(study.review), cfg.read_fpm
    )


def summary_of(study: VideoStudy) -> dict:
    """The study's numbers for summary.json and the report."""
    t, f = study.table.times, study.table.frames
    counts: dict[str, int] = {}
    for g in study.segments:
        counts[g.finding] = counts.get(g.finding, 0) + 1
    return {
        "video": study.video,
        "n_frames": len(f),
        "first_frame": int(f[0]) if len(f) else None,
        "last_frame": int(f[-1]) if len(f) else None,
        "duration_s": float(t[-1] - t[0]) if len(t) else 0.0,
        "unreadable_frames": int(study.table.unreadable.sum()),
        "segments": len(study.segments),
        "segments_by_finding": counts,
        "sections": study.sections.to_dict(t, f) if len(t) else {},
        "section_names": list(SECTIONS),
        "budget": study.budget,
        "quality": {k: v for k, v in study.quality.items() if k != "flags"},
    }
