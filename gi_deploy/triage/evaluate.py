"""``--evaluate LABELS``: a study scored against Kvasir-Capsule-style frame labels.

Labels are ``metadata.csv`` rows (video id, frame number, finding; ``;`` or ``,`` separated). In a
capsule study most frames carry no label (2.4% in Kvasir-Capsule), and an unlabelled frame is
unknown, not normal: so findings are scored as *events* (a run of frames labelled with one class,
gaps of at most ``gap`` frames) found or missed, specificity only on frames labelled normal, and a
predicted segment over frames nobody labelled is neither right nor wrong (counted apart).

- event sensitivity: an event is found when a segment of its class overlaps it, widened by
  ``tolerance`` frames on each side; per class, overall, and per video;
- per-video detection: a video with events counts as detected when any of its events is found
  (the per-patient sensitivity of the reading-aid studies);
- segmental F1 at IoU 0.1/0.25/0.5 (ColonTCN's measure): each segment is matched to the
  unmatched event of its class with the highest IoU (over frame-number spans); segments that
  cover no labelled frame are left out;
- landmark time error: the change point's time against the first frame labelled with its
  landmark class;
- flagged frames per hour: the study's review budget.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy.errors import DataError
from gi_deploy.triage.roles import SECTIONS, key
from gi_deploy.triage.study import VideoStudy
from gi_deploy.triage.temporal import Segment

IOUS = (0.1, 0.25, 0.5)
VIDEO_COLUMNS = ("video_id", "video")
FRAME_COLUMNS = ("frame_number", "frame")
CLASS_COLUMNS = ("finding_class", "finding", "class", "label")


@dataclass(frozen=True)
class Event:
    video: str
    finding: str
    start: int  # frame numbers, inclusive
    end: int
    n_labelled: int


def read_labels(path: Path) -> dict[str, dict[int, str]]:
    """``video -> frame number -> class`` from a Kvasir-Capsule ``metadata.csv`` (or any CSV with a
    video, a frame and a class column). Raises DataError naming the file and what is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--evaluate {path}: no such file")
    text = path.read_text(encoding="utf-8-sig")
    first = text.splitlines()[0] if text else ""
    reader = csv.DictReader(text.splitlines(), delimiter=";" if first.count(";") > first.count(",") else ",")
    cols = {c.strip().lower(): c for c in reader.fieldnames or ()}

    def pick(options):
        return next((cols[c] for c in options if c in cols), None)

    vcol, fcol, ccol = pick(VIDEO_COLUMNS), pick(FRAME_COLUMNS), pick(CLASS_COLUMNS)
    if not (vcol and fcol and ccol):
        raise DataError(
            f"--evaluate {path}: needs a video ({'/'.join(VIDEO_COLUMNS)}), a frame "
            f"({'/'.join(FRAME_COLUMNS)}) and a class ({'/'.join(CLASS_COLUMNS)}) column; it has "
            f"{', '.join(reader.fieldnames or [])}"
        )
    out: dict[str, dict[int, str]] = {}
    for line, row in enumerate(reader, start=2):
        try:
            frame = int(row[fcol])
        except (TypeError, ValueError):
            raise DataError(f"--evaluate {path} line {line}: frame {row.get(fcol)!r} is not a number") from None
        out.setdefault(row[vcol].strip(), {})[frame] = row[ccol].strip()
    if not out:
        raise DataError(f"--evaluate {path} has no rows")
    return out


def events_of(video: str, labels: dict[int, str], classes: list[str], gap: int) -> list[Event]:
    """Events of ``classes`` (matched by spelling-insensitive key) in one video's labels: runs of
    frames labelled with one class whose consecutive labelled frames are at most ``gap`` apart."""
    wanted = {key(c): c for c in classes}
    by_class: dict[str, list[int]] = {}
    for frame, label in labels.items():
        if key(label) in wanted:
            by_class.setdefault(wanted[key(label)], []).append(frame)
    events = []
    for cls, frames in by_class.items():
        frames.sort()
        start = prev = frames[0]
        n = 1
        for f in frames[1:]:
            if f - prev > gap:
                events.append(Event(video, cls, start, prev, n))
                start, n = f, 0
            prev = f
            n += 1
        events.append(Event(video, cls, start, prev, n))
    return sorted(events, key=lambda e: (e.start, e.finding))


def _overlaps(g: Segment, e: Event, tolerance: int) -> bool:
    return g.finding == e.finding and g.start_frame <= e.end + tolerance and g.end_frame >= e.start - tolerance


def iou(g: Segment, e: Event) -> float:
    """Intersection over union of a segment's and an event's frame-number spans (inclusive)."""
    inter = min(g.end_frame, e.end) - max(g.start_frame, e.start) + 1
    if inter <= 0:
        return 0.0
    return inter / ((g.end_frame - g.start_frame + 1) + (e.end - e.start + 1) - inter)


def segmental_f1(segments: list[Segment], events: list[Event], threshold: float) -> dict:
    """Greedy matching: each segment, in time order, takes the unmatched event of its class with
    the highest IoU, if that is >= ``threshold`` (a TP); the rest are FPs, unmatched events FNs."""
    used: set[int] = set()
    tp = 0
    for g in segments:
        best, best_iou = None, threshold
        for i, e in enumerate(events):
            if i in used or e.finding != g.finding or e.video != g.video:
                continue
            v = iou(g, e)
            if v >= best_iou:
                best, best_iou = i, v
        if best is not None:
            used.add(best)
            tp += 1
    fp, fn = len(segments) - tp, len(events) - tp
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else None
    return {"iou": threshold, "tp": tp, "fp": fp, "fn": fn, "f1": f1}


def _time_of(study: VideoStudy, frame: int) -> float:
    """A frame number's time in the study (interpolated between the sampled frames)."""
    return float(np.interp(frame, study.table.frames, study.table.times))


def evaluate_studies(
    studies: list[VideoStudy], labels: dict[str, dict[int, str]], gap: int = 10, tolerance: int = 5
) -> dict:
    """Score ``studies`` against ``labels`` (see the module docstring). Returns a JSON-able dict."""
    by_video = {s.video: s for s in studies}
    missing = sorted(v for v in labels if v not in by_video)
    if not set(labels) & set(by_video):
        raise DataError(
            f"--evaluate: none of the labelled videos ({', '.join(sorted(labels)[:5])}) is in this study "
            f"({', '.join(sorted(by_video)[:5])}); video ids must match the video's file name or the "
            "frames' <video_id>"
        )
    roles = studies[0].roles
    findings = roles.names("findings")
    normal_keys = {key(c) for c in roles.names("normal")}
    known = {key(c) for c in roles.classes}
    per_class: dict[str, list[int]] = {c: [0, 0] for c in findings}  # found, total
    per_video, f1_rows, landmark_rows = {}, {t: [0, 0, 0] for t in IOUS}, []
    normal_total = normal_flagged = unknown_segments = 0
    other_labels: dict[str, int] = {}
    for video, lab in sorted(labels.items()):
        s = by_video.get(video)
        if s is None:
            continue
        for cls in lab.values():
            if key(cls) not in known:
                other_labels[cls] = other_labels.get(cls, 0) + 1
        events = events_of(video, lab, findings, gap)
        found = [any(_overlaps(g, e, tolerance) for g in s.segments) for e in events]
        for e, ok in zip(events, found):
            per_class[e.finding][0] += ok
            per_class[e.finding][1] += 1
        per_video[video] = {
            "events": len(events),
            "found": int(sum(found)),
            "sensitivity": sum(found) / len(events) if events else None,
            "detected": bool(any(found)) if events else None,
            "flagged_per_hour": s.budget.get("flagged_per_hour"),
        }
        labelled = np.array(sorted(lab), np.int64)
        scored = []
        for g in s.segments:
            if ((labelled >= g.start_frame) & (labelled <= g.end_frame)).any():
                scored.append(g)
            else:
                unknown_segments += 1
        for t in IOUS:
            r = segmental_f1(scored, events, t)
            for i, k in enumerate(("tp", "fp", "fn")):
                f1_rows[t][i] += r[k]
        for frame, cls in lab.items():
            if key(cls) in normal_keys:
                normal_total += 1
                normal_flagged += any(g.start_frame <= frame <= g.end_frame for g in s.segments)
        for i, lm in enumerate(roles.names("landmarks")):
            frames = sorted(f for f, c in lab.items() if key(c) == key(lm))
            if not frames:
                continue
            b = s.sections.bounds[i] if i < len(s.sections.bounds) else None
            truth = _time_of(s, frames[0])
            predicted = None if b is None else float(s.table.times[b])
            landmark_rows.append(
                {
                    "video": video,
                    "landmark": lm,
                    "section_begins": SECTIONS[i + 1],
                    "labelled_frame": frames[0],
                    "labelled_time_s": truth,
                    "predicted_time_s": predicted,
                    "error_s": None if predicted is None else abs(predicted - truth),
                }
            )
    total_found = sum(v[0] for v in per_class.values())
    total = sum(v[1] for v in per_class.values())
    videos_with = [v for v in per_video.values() if v["events"]]
    f1 = {}
    for t, (tp, fp, fn) in f1_rows.items():
        f1[str(t)] = {"tp": tp, "fp": fp, "fn": fn, "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None}
    errors = [r["error_s"] for r in landmark_rows if r["error_s"] is not None]
    hours = sum(s.budget.get("duration_s", 0.0) for s in studies if s.video in labels) / 3600
    flagged = sum(s.budget.get("flagged_frames", 0) for s in studies if s.video in labels)
    return {
        "gap_frames": gap,
        "tolerance_frames": tolerance,
        "events": total,
        "events_found": total_found,
        "event_sensitivity": total_found / total if total else None,
        "per_class": {
            c: {"found": f, "events": n, "sensitivity": f / n if n else None} for c, (f, n) in per_class.items()
        },
        "per_video": per_video,
        "videos_detected": sum(bool(v["detected"]) for v in videos_with),
        "videos_with_events": len(videos_with),
        "per_video_sensitivity": (
            sum(bool(v["detected"]) for v in videos_with) / len(videos_with) if videos_with else None
        ),
        "flagged_per_hour": flagged / hours if hours > 0 else None,
        "segmental_f1": f1,
        "segments_over_unlabelled_frames": unknown_segments,
        "landmarks": landmark_rows,
        "landmark_mean_error_s": float(np.mean(errors)) if errors else None,
        "specificity_on_normal_frames": (1 - normal_flagged / normal_total) if normal_total else None,
        "normal_frames": normal_total,
        "labels_not_model_classes": other_labels,
        "videos_not_in_study": missing,
        "note": "unlabelled frames are unknown, not negative: specificity is measured on frames labelled normal "
        "only, and segments over frames nobody labelled are left out of the segmental F1",
    }
