"""``gi-deploy triage``: a capsule study through the runtime's job pipeline (runtime/job.py: resumable,
locked, one row per frame with its video, frame number and time), then the study (triage/study.py),
the review list's near-duplicates and contact sheets, the report files and, given labels, the
evaluation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from gi_deploy._io import utc_now
from gi_deploy.core.preprocess import PreprocessSpec, load_rgb, to_pixels
from gi_deploy.errors import ConfigError, DataError
from gi_deploy.runtime.decode.cpu import decoded_batches, default_workers
from gi_deploy.runtime.infer import capped_workers, open_strategy
from gi_deploy.runtime.job import InferConfig, answered, plan_job, run_job
from gi_deploy.triage.config import TriageConfig
from gi_deploy.triage.evaluate import evaluate_studies, read_labels
from gi_deploy.triage.inputs import StudyInputs, collect_study
from gi_deploy.triage.report import clock, contact_sheet, write_frames, write_html, write_segments, write_summary
from gi_deploy.triage.review import HASH_BYTES, dhash
from gi_deploy.triage.roles import class_roles, key
from gi_deploy.triage.stream import video_batches
from gi_deploy.triage.study import analyse, read_predictions, select_review, summary_of

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.csv"


@dataclass
class TriageResult:
    out_dir: Path
    files: dict[str, Path]
    summary: dict
    studies: list = field(default_factory=list)
    evaluation: dict | None = None
    n_classified: int = 0
    n_resumed: int = 0
    seconds: float = 0.0


def infer_config(cfg: TriageConfig) -> InferConfig:
    """The job's config: the predictions CSV in the report folder, no label scoring (triage scores
    events, not frames)."""
    return InferConfig(
        inputs=cfg.inputs,
        deploy_dir=cfg.deploy_dir,
        sources=[cfg.source] if cfg.source else None,
        out_csv=cfg.out_dir / PREDICTIONS,
        batch_size=cfg.batch_size,
        backend=cfg.backend,
        precision=cfg.precision,
        device=cfg.device,
        workers=capped_workers(cfg.workers),
        threads=cfg.threads,
        resume=cfg.resume,
        score=False,
    )


def _triage_source(strategy) -> str:
    """The one model whose classes the study reads: the only one, or under --source auto the
    built-in kvasir (capsule) bundle if routed to, else the first."""
    names = list(strategy.bundles)
    if len(strategy.slots) > 1:
        raise ConfigError(
            f"triage reads one model's classes; these bundles are {', '.join(names)}: give --source "
            "with one of them (or auto)"
        )
    return next((n for n in names if key(n) == "kvasir"), names[0])


def _hashing(batches: Iterable, specs: tuple[PreprocessSpec, ...], hashes: dict) -> Iterator:
    """Pass the decoded batches on, keeping each readable frame's dHash (of its first spec's
    pixels): the near-duplicate check needs no second decode of the frames classified now."""
    for b in batches:
        pixels = iter(b.inputs[0]) if b.inputs else iter(())
        for item, error in zip(b.paths, b.errors):
            if error is None:
                hashes[item] = dhash(next(pixels))
        yield b


def frame_images(inputs: StudyInputs, items: list[Path]) -> Iterator[tuple[Path, Image.Image | None]]:
    """The RGB images of ``items`` (study order), decoded again: a video's by seeking, frame files
    read. None for one that cannot be read."""
    if inputs.video is None:
        for item in items:
            try:
                yield item, load_rgb(item)
            except DataError:
                yield item, None
        return
    from gi_deploy.triage.video import decode_frames  # PyAV: the video extra

    pos = inputs._pos
    order = sorted(items, key=lambda p: pos[p])
    by_frame = {int(inputs.frames[pos[p]]): p for p in order}
    for number, image, _ in decode_frames(inputs.video, np.array(sorted(by_frame), np.int64)):
        yield by_frame[number], image


def triage(cfg: TriageConfig, progress: Callable[[int, int], None] | None = None) -> TriageResult:
    """Triage ``cfg.inputs`` into ``cfg.out_dir`` (see the module docstring). Raises ConfigError /
    DataError / BundleError before any frame is classified when the input, the roles or the
    bundle are wrong; a damaged video keeps the frames before the damage (one warning)."""
    inputs = collect_study(cfg.inputs, cfg.fps, cfg.frame_rate)
    labels = read_labels(cfg.labels) if cfg.labels is not None else None  # a bad labels file: before the model
    icfg = infer_config(cfg)
    strategy = open_strategy(icfg, load=False)  # manifests only: the roles are checked before any model loads
    source = _triage_source(strategy)
    classes = strategy.classes_of(source)
    roles = class_roles(source, classes, cfg.normal, cfg.landmark, cfg.quality)
    for note in inputs.notes:
        log.warning("%s: %s", cfg.inputs, note)
    strategy = open_strategy(icfg)
    job = plan_job(icfg, inputs, strategy)
    specs = strategy.specs
    workers = (
        icfg.workers
        if icfg.workers is not None
        else default_workers(gpu=any(getattr(b, "device", "cpu") == "cuda" for b in strategy.bundles.values()))
    )
    hashes: dict[Path, np.ndarray] = {}

    def batches(todo: list) -> Iterable:
        if inputs.video is not None:
            decoded = video_batches(inputs, todo, specs, cfg.batch_size)
        else:
            decoded = decoded_batches(todo, specs, cfg.batch_size, workers)
        return answered(strategy, _hashing(decoded, specs, hashes))

    result = run_job(icfg, job, batches, progress)
    return report(cfg, inputs, source, roles, specs, hashes, labels, result)


def report(
    cfg: TriageConfig, inputs: StudyInputs, source: str, roles, specs, hashes: dict, labels, result
) -> TriageResult:
    """The study from the job's CSV, the review list and the report files."""
    out = cfg.out_dir
    tables = read_predictions(out / PREDICTIONS, source, list(roles.classes))
    if not tables:
        raise DataError(f"{out / PREDICTIONS} has no frame rows: nothing was classified")
    item_of = {inputs.rel(p): p for p in inputs.paths}
    studies = [analyse(t, roles, cfg) for t in tables]
    # the flagged frames a resumed run classified before the kill have no hash yet: decode those again
    missing = [
        item_of[s.table.items[i]]
        for s in studies
        for i in np.flatnonzero(s.flagged)
        if item_of[s.table.items[i]] not in hashes
    ]
    for item, image in frame_images(inputs, missing):
        if image is not None:
            hashes[item] = dhash(to_pixels(image, specs[0]))
    sheets: dict[str, dict[str, Image.Image]] = {}
    wanted = []
    for s in studies:
        h = np.zeros((len(s.table.items), HASH_BYTES), np.uint8)
        for i in np.flatnonzero(s.flagged):
            got = hashes.get(item_of[s.table.items[i]])
            if got is not None:
                h[i] = got
            else:  # unreadable now: a unique hash, so it stays on the list rather than silently dropped
                h[i] = np.frombuffer(np.random.default_rng(i).bytes(HASH_BYTES), np.uint8)
        select_review(s, h, cfg)
        wanted += [item_of[s.table.items[r["position"]]] for top in s.top.values() for r in top]
    thumbs = {item: image.copy() for item, image in frame_images(inputs, wanted) if image is not None}
    for s in studies:
        for finding, top in s.top.items():
            cells = []
            for r in top:
                item = item_of[s.table.items[r["position"]]]
                if item in thumbs:
                    p = r["position"]
                    cells.append((thumbs[item], f"#{s.table.frames[p]}  {clock(s.table.times[p])}  p={r['score']:.2f}"))
            if cells:
                sheets.setdefault(s.video, {})[finding] = contact_sheet(cells)
    evaluation = evaluate_studies(studies, labels, cfg.gap, cfg.tolerance) if labels is not None else None
    summary = {
        "input": str(cfg.inputs),
        "model": source,
        "created": utc_now(),
        "roles": roles.to_dict(),
        "settings": {
            "smoothing": cfg.smoothing,
            "window": cfg.window,
            "high": cfg.high,
            "low": cfg.low,
            "min_frames": cfg.min_frames,
            "landmark_evidence": cfg.landmark_evidence,
            "fps": cfg.fps,
            "duplicate_bits": cfg.duplicate_bits,
            "top_k": cfg.top_k,
            "read_fpm": cfg.read_fpm,
        },
        "notes": list(inputs.notes),
        "videos": [summary_of(s) for s in studies],
        "classified": result.n_classified,
        "resumed": result.n_resumed,
        "unreadable": result.n_errors,
        "seconds": result.seconds,
    }
    if evaluation is not None:
        summary["evaluation"] = evaluation
    files = {
        "predictions": out / PREDICTIONS,
        "segments": write_segments(out / "segments.csv", studies),
        "frames": write_frames(out / "frames.csv", studies),
    }
    for video, by_finding in sheets.items():  # the contact sheets as files too (the README's image)
        for finding, sheet in by_finding.items():
            name = f"contact_{video}_{key(finding)}.jpg"
            sheet.save(out / name, quality=88)
            files[f"contact:{video}:{finding}"] = out / name
    files["summary"] = write_summary(out / "summary.json", summary)
    files["report"] = write_html(out / "report.html", summary, studies, sheets, evaluation)
    return TriageResult(out, files, summary, studies, evaluation, result.n_classified, result.n_resumed, result.seconds)
