"""What a triage writes: ``segments.csv``, ``frames.csv``, ``summary.json`` and ``report.html``, one
self-contained file (timeline plot and contact sheets embedded as PNG/JPEG data, no other file
needed) that a reader can open anywhere. Each file is written to a temporary name and moved into
place, so a killed run never leaves half a report."""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gi_deploy._io import write_json
from gi_deploy.triage.roles import SECTIONS
from gi_deploy.triage.study import VideoStudy

SECTION_COLOURS = ("#f4c7c3", "#fce8b2", "#c9daf8")  # stomach, small bowel, colon: the reading-software colour bar
THUMB = 128  # contact-sheet thumbnail side, pixels
SEGMENT_COLUMNS = (
    "video",
    "finding",
    "start_frame",
    "end_frame",
    "peak_frame",
    "start_time",
    "end_time",
    "peak_time",
    "n_frames",
    "max_score",
    "mean_score",
    "review_frames",
)


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)


def write_segments(path: Path, studies: list[VideoStudy]) -> Path:
    """One row per segment: its class, frames, times, peak and scores, and how many of its frames
    are on the review list after near-duplicate removal."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, SEGMENT_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for s in studies:
            review = np.zeros(len(s.table.frames), bool)
            review[s.review] = True
            for g in s.segments:
                w.writerow(
                    {
                        **g.to_row(),
                        "max_score": f"{g.max_score:.4f}",
                        "mean_score": f"{g.mean_score:.4f}",
                        "start_time": f"{g.start_time:.3f}",
                        "end_time": f"{g.end_time:.3f}",
                        "peak_time": f"{g.peak_time:.3f}",
                        "review_frames": int(review[g.start : g.end + 1].sum()),
                    }
                )
    _replace(tmp, path)
    return path


def write_frames(path: Path, studies: list[VideoStudy]) -> Path:
    """One row per frame: its video, number, time, section, smoothed finding scores, the segment it
    is in (index into segments.csv's rows of that video, blank when none), whether it is on the
    review list and whether its view is poor (reduced view, refused, unreadable)."""
    tmp = path.with_name(path.name + ".tmp")
    findings = studies[0].roles.names("findings") if studies else []
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "video",
                "frame",
                "time_s",
                "path",
                "section",
                "segment",
                "review",
                "poor_view",
                *(f"score:{c}" for c in findings),
            ]
        )
        for s in studies:
            seg = np.full(len(s.table.frames), -1, np.int64)
            for i, g in enumerate(s.segments):
                seg[g.start : g.end + 1] = np.where(seg[g.start : g.end + 1] < 0, i, seg[g.start : g.end + 1])
            review = np.zeros(len(seg), bool)
            review[s.review] = True
            labels = s.sections.labels()
            scores = s.finding_scores()
            poor = s.quality["flags"]
            for i in range(len(seg)):
                w.writerow(
                    [
                        s.video,
                        int(s.table.frames[i]),
                        f"{s.table.times[i]:.3f}",
                        s.table.items[i],
                        SECTIONS[labels[i]] if labels[i] >= 0 else "",
                        "" if seg[i] < 0 else int(seg[i]),
                        int(review[i]),
                        int(poor[i]),
                        *(f"{x:.4f}" for x in scores[i]),
                    ]
                )
    _replace(tmp, path)
    return path


def write_summary(path: Path, summary: dict) -> Path:
    write_json(path, summary)
    return path


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def timeline_png(s: VideoStudy) -> str:
    """The study's timeline as base64 PNG: the section colour bar, each finding's smoothed score
    with its segments marked, and the poor-view track; x in minutes."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede the pyplot import
    import matplotlib.pyplot as plt

    t = (s.table.times - s.table.times[0]) / 60.0 if len(s.table.times) else np.zeros(0)
    findings = s.roles.names("findings")
    scores = s.finding_scores()
    fig, axes = plt.subplots(3, 1, figsize=(11, 4.2), sharex=True, gridspec_kw={"height_ratios": [0.5, 3, 0.5]})
    bar, main, quality = axes
    labels = s.sections.labels()
    for k, name in enumerate(SECTIONS):
        idx = np.flatnonzero(labels == k)
        if len(idx):
            bar.axvspan(t[idx[0]], t[idx[-1]], color=SECTION_COLOURS[k], label=name)
            main.axvspan(t[idx[0]], t[idx[-1]], color=SECTION_COLOURS[k], alpha=0.35, lw=0)
    bar.set_yticks([])
    if (labels >= 0).any():
        bar.legend(loc="upper right", ncol=3, fontsize=7, frameon=False, bbox_to_anchor=(1, 2.2))
    if (labels < 0).any():  # not found: left blank and said, never guessed
        idx = np.flatnonzero(labels < 0)
        bar.text(
            (t[idx[0]] + t[idx[-1]]) / 2,
            0.5,
            "section undetermined",
            ha="center",
            va="center",
            fontsize=7,
            color="#666666",
            transform=bar.get_xaxis_transform(),
        )
    bar.set_title(f"{s.video}: sections, finding scores (smoothed) and segments", fontsize=9, loc="left")
    colours = plt.cm.tab10(np.arange(max(1, len(findings))) % 10)
    for j, name in enumerate(findings):
        main.plot(t, scores[:, j], lw=0.8, color=colours[j], label=name)
    for g in s.segments:
        j = findings.index(g.finding)
        main.axvspan(t[g.start], t[g.end] + 1e-3, ymin=0.92, ymax=1.0, color=colours[j])
        main.plot([t[g.peak]], [g.max_score], marker="v", color=colours[j], ms=5)
    main.set_ylim(0, 1.08)
    main.set_ylabel("score", fontsize=8)
    main.legend(loc="upper left", fontsize=7, ncol=min(6, len(findings)), frameon=False, bbox_to_anchor=(0, -0.55))
    quality.fill_between(t, 0, s.quality["flags"].astype(float), step="mid", color="#999999", lw=0)
    quality.set_yticks([])
    quality.set_ylabel("poor", fontsize=7, rotation=0, ha="right")
    quality.set_xlabel("minutes from the first frame", fontsize=8)
    for ax in axes:
        ax.tick_params(labelsize=7)
    out = _png(fig)
    plt.close(fig)
    return out


def contact_sheet(images: list[tuple[Image.Image, str]], columns: int = 6) -> Image.Image:
    """A grid of ``THUMB`` px thumbnails, each captioned (frame, time, score)."""
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (columns * THUMB, rows * (THUMB + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(images):
        x, y = (i % columns) * THUMB, (i // columns) * (THUMB + 14)
        sheet.paste(img.convert("RGB").resize((THUMB - 4, THUMB - 4)), (x + 2, y + 2))
        draw.text((x + 3, y + THUMB), caption, fill="black")
    return sheet


def _jpeg(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def clock(x: float | None) -> str:
    """Seconds as h:mm:ss (n/a for None)."""
    if x is None:
        return "n/a"
    return f"{int(x // 3600)}:{int(x % 3600 // 60):02d}:{int(x % 60):02d}"


def _table(header: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


CSS = (
    "body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}"
    "table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;"
    "text-align:left}th{background:#f2f2f2}.note{color:#555;font-size:13px}img{max-width:100%}"
    ".warn{background:#fff3cd;padding:6px 10px;border-left:4px solid #e0a800}"
)


def write_html(
    path: Path,
    summary: dict,
    studies: list[VideoStudy],
    sheets: dict[str, dict[str, Image.Image]],
    evaluation: dict | None = None,
) -> Path:
    """report.html: per video the summary line, sections and transit times, the review budget,
    the timeline, the segments, and a contact sheet per finding; the evaluation when labels were
    given. ``sheets[video][finding]`` the contact sheets (PIL images)."""
    name = html.escape(str(summary["input"]))
    parts = [
        (
            f"<!doctype html><html><head><meta charset='utf-8'><title>gi-deploy triage: {name}</title>"
            f"<style>{CSS}</style></head><body>"
        ),
        f"<h1>Capsule triage: {name}</h1>",
        (
            f"<p class='note'>Model: {html.escape(str(summary['model']))}. A reading aid, not a diagnosis: every "
            "frame outside the review list still belongs to the study.</p>"
        ),
    ]
    for note in summary.get("notes", []):
        parts.append(f"<p class='warn'>{html.escape(note)}</p>")
    for s, v in zip(studies, summary["videos"]):
        b, sec, q = v["budget"], v["sections"], v["quality"]
        parts.append(f"<h2>{html.escape(s.video)}</h2>")
        parts.append(
            f"<p><b>{v['n_frames']:,} frames over {clock(v['duration_s'])}: {v['segments']} suspected-finding "
            f"segments, {b['flagged_frames']:,} frames flagged ({b['flagged_percent']:.2f}%), "
            f"{b['review_frames']:,} to review after near-duplicate removal, about "
            f"{b['reading_minutes']:.1f} min at {b['frames_per_minute']:g} frames/min.</b></p>"
        )
        if sec.get("incomplete"):
            parts.append(f"<p class='warn'>Incomplete study: {html.escape(sec.get('reason', ''))}</p>")
        elif sec.get("reason"):
            parts.append(f"<p class='warn'>{html.escape(sec['reason'])}</p>")
        parts.append(
            _table(
                ["", "frame", "time", "transit"],
                [
                    [
                        "first small-bowel frame",
                        sec.get("first_small_bowel_frame", "n/a"),
                        clock(sec.get("first_small_bowel_time")),
                        f"gastric {clock(sec.get('gastric_s'))}",
                    ],
                    [
                        "first colon frame",
                        sec.get("first_colon_frame", "n/a"),
                        clock(sec.get("first_colon_time")),
                        f"small bowel {clock(sec.get('small_bowel_s'))}, colon {clock(sec.get('colon_s'))}",
                    ],
                ],
            )
        )
        parts.append(
            _table(
                [
                    "flagged",
                    "per hour",
                    "% of study",
                    "to review",
                    "per hour",
                    "% of study",
                    "reading time",
                    "poor view",
                ],
                [
                    [
                        b["flagged_frames"],
                        f"{b['flagged_per_hour'] or 0:.0f}",
                        f"{b['flagged_percent']:.2f}",
                        b["review_frames"],
                        f"{b['review_per_hour'] or 0:.0f}",
                        f"{b['review_percent']:.2f}",
                        f"{b['reading_minutes']:.1f} min",
                        (
                            f"{100 * q['poor_share']:.1f}% ({q['reduced_view']} reduced view, {q['refused']} "
                            "refused or unreadable)"
                        ),
                    ]
                ],
            )
        )
        if len(s.table.times):
            parts.append(f"<img alt='timeline' src='data:image/png;base64,{timeline_png(s)}'>")
        parts.append(
            _table(
                ["#", "finding", "frames", "time", "peak frame", "max", "mean"],
                [
                    [
                        i,
                        g.finding,
                        f"{g.start_frame}-{g.end_frame} ({g.n_frames})",
                        f"{clock(g.start_time)}-{clock(g.end_time)}",
                        g.peak_frame,
                        f"{g.max_score:.2f}",
                        f"{g.mean_score:.2f}",
                    ]
                    for i, g in enumerate(s.segments)
                ],
            )
        )
        for finding, sheet in sheets.get(s.video, {}).items():
            parts.append(
                f"<h3>{html.escape(finding)}: top {len(s.top[finding])} frames</h3>"
                f"<img alt='{html.escape(finding)}' src='data:image/jpeg;base64,{_jpeg(sheet)}'>"
            )
    if evaluation:
        e = evaluation
        parts.append("<h2>Evaluation against the labels</h2>")
        parts.append(
            f"<p class='note'>{html.escape(e['note'])}. Events: runs of one class with gaps of at most "
            f"{e['gap_frames']} frames; found when a segment of the class overlaps it within "
            f"{e['tolerance_frames']} frames.</p>"
        )
        pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
        parts.append(
            _table(
                [
                    "event sensitivity",
                    "per-video sensitivity",
                    "flagged / hour",
                    "specificity (normal frames)",
                    *(f"segmental F1@{t}" for t in e["segmental_f1"]),
                    "landmark error",
                ],
                [
                    [
                        f"{pct(e['event_sensitivity'])} ({e['events_found']}/{e['events']})",
                        f"{pct(e['per_video_sensitivity'])} ({e['videos_detected']}/{e['videos_with_events']})",
                        f"{e['flagged_per_hour'] or 0:.0f}",
                        f"{pct(e['specificity_on_normal_frames'])} of {e['normal_frames']}",
                        *(pct(r["f1"]) for r in e["segmental_f1"].values()),
                        "n/a" if e["landmark_mean_error_s"] is None else clock(e["landmark_mean_error_s"]),
                    ]
                ],
            )
        )
        parts.append(
            _table(
                ["class", "found", "events", "sensitivity"],
                [[c, r["found"], r["events"], pct(r["sensitivity"])] for c, r in e["per_class"].items()],
            )
        )
    parts.append("</body></html>")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    _replace(tmp, path)
    return path
