"""``gi-deploy triage``: a capsule study -> findings timeline, review list and report (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from gi_deploy.cli._display import arg, image_progress, interrupted_keeps, opt, out, reported
from gi_deploy.core.choices import BackendName, Device, Precision
from gi_deploy.core.fields import default_of
from gi_deploy.triage.config import TriageConfig
from gi_deploy.triage.run import PREDICTIONS, TriageResult, triage

T = TriageConfig


def triage_lines(r: TriageResult) -> list[str]:
    lines = []
    for v in r.summary["videos"]:
        b, sec = v["budget"], v["sections"]
        lines.append(
            f"{v['video']}: {v['n_frames']} frames, {v['segments']} segments "
            f"({', '.join(f'{k} {n}' for k, n in v['segments_by_finding'].items()) or 'none'}); flagged "
            f"{b['flagged_frames']} ({b['flagged_percent']:.2f}%, {b['flagged_per_hour'] or 0:.0f}/h), "
            f"review {b['review_frames']} after near-duplicates, ~{b['reading_minutes']:.1f} min at "
            f"{b['frames_per_minute']:g} frames/min"
        )
        if sec.get("incomplete") or sec.get("reason"):
            lines.append(f"{v['video']}: {sec['reason']}")
    e = r.evaluation
    if e:
        pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
        f1 = ", ".join(f"@{t} {pct(x['f1'])}" for t, x in e["segmental_f1"].items())
        lines.append(
            f"evaluation: event sensitivity {pct(e['event_sensitivity'])} ({e['events_found']}/{e['events']}),"
            f" per video {pct(e['per_video_sensitivity'])}, flagged {e['flagged_per_hour'] or 0:.0f}/h, "
            f"segmental F1 {f1}, specificity on {e['normal_frames']} normal-labelled frames "
            f"{pct(e['specificity_on_normal_frames'])} (unlabelled frames are unknown, not negative)"
        )
    lines.append(
        f"{r.n_classified} frames classified ({r.n_resumed} resumed) in {r.seconds:.1f}s -> {r.files['report']}"
    )
    return lines


def triage_cmd(
    inputs: Annotated[str, arg(T, "inputs", metavar="INPUT")],
    out_dir: Annotated[Path, opt(T, "out_dir", "--out")] = default_of(T, "out_dir"),
    deploy_dir: Annotated[Path, opt(T, "deploy_dir", "--deploy")] = default_of(T, "deploy_dir"),
    source: Annotated[Optional[str], opt(T, "source", "--source")] = None,
    fps: Annotated[Optional[float], opt(T, "fps", "--fps")] = None,
    frame_rate: Annotated[Optional[float], opt(T, "frame_rate", "--frame-rate")] = None,
    normal: Annotated[Optional[list[str]], opt(T, "normal", "--normal")] = None,
    landmark: Annotated[Optional[list[str]], opt(T, "landmark", "--landmark")] = None,
    quality: Annotated[Optional[list[str]], opt(T, "quality", "--quality")] = None,
    smoothing: Annotated[str, opt(T, "smoothing", "--smoothing")] = default_of(T, "smoothing"),
    window: Annotated[int, opt(T, "window", "--window")] = default_of(T, "window"),
    high: Annotated[float, opt(T, "high", "--high")] = default_of(T, "high"),
    low: Annotated[float, opt(T, "low", "--low")] = default_of(T, "low"),
    top_k: Annotated[int, opt(T, "top_k", "--top-k")] = default_of(T, "top_k"),
    read_fpm: Annotated[float, opt(T, "read_fpm", "--read-fpm")] = default_of(T, "read_fpm"),
    labels: Annotated[Optional[Path], opt(T, "labels", "--evaluate")] = None,
    gap: Annotated[int, opt(T, "gap", "--gap")] = default_of(T, "gap"),
    tolerance: Annotated[int, opt(T, "tolerance", "--tolerance")] = default_of(T, "tolerance"),
    precision: Annotated[Precision, opt(T, "precision", "--precision")] = Precision.fp32,
    device: Annotated[Device, opt(T, "device", "--device")] = Device.auto,
    backend: Annotated[BackendName, opt(T, "backend", "--backend")] = BackendName.auto,
    batch_size: Annotated[int, opt(T, "batch_size", "--batch-size")] = default_of(T, "batch_size"),
    threads: Annotated[Optional[int], opt(T, "threads", "--threads")] = None,
    workers: Annotated[Optional[int], opt(T, "workers", "--workers")] = None,
    resume: Annotated[bool, opt(T, "resume", "--resume")] = False,
) -> None:
    """Triage a capsule study (a video, or Kvasir-Capsule frames): finding segments, sections and transit
    times, a review list without near-duplicates, the review budget, report.html; --evaluate scores it."""
    with reported():
        cfg = TriageConfig(
            inputs=inputs,
            out_dir=out_dir,
            deploy_dir=deploy_dir,
            source=source,
            fps=fps,
            frame_rate=frame_rate,
            normal=normal,
            landmark=landmark,
            quality=quality,
            smoothing=smoothing,
            window=window,
            high=high,
            low=low,
            top_k=top_k,
            read_fpm=read_fpm,
            labels=labels,
            gap=gap,
            tolerance=tolerance,
            precision=precision.value,
            device=device.value,
            backend=backend.value,
            batch_size=batch_size,
            threads=threads,
            workers=workers,
            resume=resume,
        )
        with interrupted_keeps(cfg.out_dir / PREDICTIONS), image_progress("triage") as progress:
            r = triage(cfg, progress)
    for line in triage_lines(r):
        out.print(line, soft_wrap=True)
