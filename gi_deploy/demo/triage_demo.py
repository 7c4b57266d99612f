"""The demo's capsule study: a synthetic video (mp4) with known sections, injected finding runs and a
stalled capsule's near-duplicates, triaged by the capsule bundle and scored against its labels.
It tests the pipeline's logic (decode, times, segments, review list, evaluation), not clinical
performance: the frames are drawn, and the demo's model has no landmark classes, so the sections
it knows are in the labels only and the report says the study's sections cannot be found."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gi_deploy.demo.synthetic import CLASSES, plan_capsule_study, render_capsule_study, write_capsule_labels
from gi_deploy.triage.config import TriageConfig
from gi_deploy.triage.run import TriageResult, triage
from gi_deploy.triage.video import write_video

STUDY_FPS = 2.0  # frames per second of the synthetic study (capsules record 2-6)
STUDY_MINUTES = 10
VIDEO_ID = "synthetic_capsule_study"


def write_study(
    folder: Path, minutes: float = STUDY_MINUTES, fps: float = STUDY_FPS, size: int = 64, seed: int = 0
) -> tuple[Path, Path]:
    """``(video, labels)``: ``<folder>/<VIDEO_ID>.mp4`` and its Kvasir-style ``metadata.csv``."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = plan_capsule_study(int(minutes * 60 * fps), fps, seed=seed)
    video = folder / f"{VIDEO_ID}.mp4"
    write_video(video, render_capsule_study(plan, size, seed), fps)
    return video, write_capsule_labels(plan, folder / "metadata.csv", VIDEO_ID)


def run_triage_demo(
    deploy: Path,
    out: Path,
    source: str = "capsule",
    seed: int = 0,
    size: int = 64,
    minutes: float = STUDY_MINUTES,
    say: Callable[[str], None] = print,
) -> TriageResult:
    """Write the study, triage it with ``source``'s bundle and evaluate it against its labels."""
    video, labels = write_study(out / "study", minutes=minutes, size=size, seed=seed)
    say(f"triage: a {minutes:g}-minute synthetic capsule video ({video.name}), finding runs and near-duplicates")
    return triage(
        TriageConfig(
            inputs=video, out_dir=out / "report", deploy_dir=deploy, source=source, normal=[CLASSES[0]], labels=labels
        )
    )
