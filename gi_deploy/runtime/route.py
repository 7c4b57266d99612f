"""``gi-deploy infer INPUT --source auto``: each image goes to the model of the source the router
says it came from, and is refused when that model's in-distribution check says no model here was
trained for it. Torch-free: the router (core/router.py) and the check (core/ood.py) are numpy.

One CSV row per image, in the predictions contract of runtime/evaluate.py, plus the routing
columns: ``source`` is the routed source; ``router_confidence`` the router's probability for it;
``id_score`` the chosen model's Mahalanobis score and ``id_threshold`` its bound; ``rejected`` 1
with a ``reason`` (and no diagnosis: empty prediction and probabilities) when the router's novelty
check says no source's frames look like the image (core/router.py: blank, saturated, pattern
frames), or when the routed model's score is over its bound.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gi_deploy._io import exclusive_lock
from gi_deploy.core.bundles import list_bundles
from gi_deploy.core.metrics import softmax
from gi_deploy.core.ood import IdStats, load_id_stats
from gi_deploy.core.router import Router, load_router
from gi_deploy.errors import BundleError, ConfigError, DataError
from gi_deploy.runtime.evaluate import score_predictions
from gi_deploy.runtime.infer import (
    InferConfig,
    InferResult,
    SourceRun,
    _row,
    _rows_done,
    check_out_path,
    csv_columns,
    true_label,
)
from gi_deploy.runtime.inputs import check_label_names, collect_inputs
from gi_deploy.runtime.loader import Bundle, load_bundle
from gi_deploy.runtime.decode.cpu import decoded_batches, default_workers

log = logging.getLogger(__name__)

AUTO = "auto"
ROUTE_COLUMNS = ("router_confidence", "id_score", "id_threshold", "rejected", "reason")


def is_auto(sources: list[str] | None) -> bool:
    """Whether ``--source`` asks for routing; ``auto`` beside named sources is a ConfigError."""
    if not sources or AUTO not in sources:
        return False
    if len(set(sources)) > 1:
        raise ConfigError(f"--source auto routes every image itself; do not name other sources beside it (got "
                          f"{', '.join(sources)})")
    return True


def routed_columns(top_k: int, classes: list[str]) -> tuple[str, ...]:
    """The routed CSV header: the predictions contract with the routing columns before the prob: ones."""
    base = csv_columns(top_k, classes)
    i = base.index("error") + 1
    return (*base[:i], *ROUTE_COLUMNS, *base[i:])


def routed_specs(router: Router, bundles: dict[str, Bundle]) -> tuple[tuple, dict[str, int]]:
    """The distinct preprocessing specs to decode each image with, the router's first (index 0),
    and each source's index into them."""
    specs = tuple(dict.fromkeys([router.spec, *(b.preprocess for b in bundles.values())]))
    return specs, {s: specs.index(b.preprocess) for s, b in bundles.items()}


def open_routed(cfg: InferConfig) -> tuple[object, dict[str, Bundle], dict[str, IdStats | None], list[str]]:
    router = load_router(cfg.deploy_dir)
    missing = [s for s in router.sources if s not in list_bundles(cfg.deploy_dir)]
    if missing:
        raise BundleError(f"the router of {cfg.deploy_dir} routes to {', '.join(missing)}, which has no bundle there "
                          f"any more; re-export it, or rewrite the router: gi-deploy export --router --out "
                          f"{cfg.deploy_dir}")
    bundles, stats, notes = {}, {}, []
    for s in router.sources:
        b = load_bundle(cfg.deploy_dir / s, cfg.precision, cfg.device, backend=cfg.backend, threads=cfg.threads)
        bundles[s] = b
        stats[s] = load_id_stats(b.path, b.manifest)
        if stats[s] is None:
            notes.append(f"{s}: its bundle has no in-distribution statistics (exported before gi-deploy learnt "
                         f"routing, or without its training images): images routed to it are never refused; "
                         f"re-export it with `gi-deploy export {s} --force`")
        elif b.backend.run_features is None:
            notes.append(f"{s}: the {b.backend.name} model gives no pooled features: images routed to it are never "
                         "refused")
    for n in notes:
        log.warning(n)
    return router, bundles, stats, notes


def refusal_reason(source: str, novelty: float | None, score: float | None, threshold: float | None) -> str:
    """Why an image is refused ("" when it is not): the router's check first (no source looks like
    it), then the routed model's."""
    if novelty is not None and novelty > 1:
        return (f"not like any source's frames (router features): novelty {novelty:.2f} x the nearest source's "
                "threshold")
    if score is not None and threshold is not None and score > threshold:
        return f"out of distribution for {source}'s model: score {score:.1f} over its threshold {threshold:.1f}"
    return ""


def _routed_row(rel: str, b: Bundle, label: str, p: np.ndarray | None, k: int, error: str, classes: list[str],
                conf: float | None, score: float | None, threshold: float | None, rejected: bool,
                novelty: float | None = None) -> list[str]:
    cut = 5 + 2 * k + 1  # path, source, true_label, predicted, confidence, top-k, error
    if error:
        row = _row(rel, b, label, None, k, error, classes)
        return [*row[:cut], "", "", "", "", "", *row[cut:]]
    reason = refusal_reason(b.source, novelty, score, threshold) if rejected else ""
    row = _row(rel, b, label, None if rejected else p, k, "", classes)
    extra = [f"{conf:.6f}", "" if score is None else f"{score:.3f}", "" if threshold is None else f"{threshold:.3f}",
             "1" if rejected else "0", reason]
    return [*row[:cut], *extra, *row[cut:]]


def infer_routed(cfg: InferConfig, progress: Callable[[int, int], None] | None = None) -> InferResult:
    """Route and classify every image of ``cfg.inputs`` (``cfg.sources == ["auto"]``); write one
    CSV row per image (routing columns included), flushed every batch; ``cfg.resume`` keeps the
    images already in the CSV. Labelled rows are scored per routed source, with refused images
    counted apart (runtime/evaluate.py). Raises BundleError when the deploy folder has no router
    (with the command that writes one), DataError with ``cfg.strict`` at the first unreadable file."""
    inputs = collect_inputs(cfg.inputs, cfg.labels)
    check_out_path(cfg, inputs)  # never over an input, nor inside the input folder
    router, bundles, stats, notes = open_routed(cfg)
    all_classes = list(dict.fromkeys(c for b in bundles.values() for c in b.classes))
    if cfg.score:
        check_label_names(inputs.labels, all_classes, str(cfg.labels or cfg.inputs))
    k_top = min(cfg.top_k, max(len(b.classes) for b in bundles.values()))
    columns = routed_columns(k_top, all_classes)
    pairs, n_resumed = _rows_done(cfg.out_csv, columns) if cfg.resume else (set(), 0)
    finished = {path for path, _ in pairs}
    todo = [p for p in inputs.paths if inputs.rel(p) not in finished]
    specs, spec_of = routed_specs(router, bundles)
    cfg.out_csv.parent.mkdir(parents=True, exist_ok=True)
    start, n_done, n_classified = time.perf_counter(), 0, 0
    with exclusive_lock(cfg.out_csv, "choose another --out"), \
            open(cfg.out_csv, "a" if n_resumed else "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if not n_resumed:
            writer.writerow(columns)
        workers = cfg.workers if cfg.workers is not None else default_workers(
            gpu=any(b.device == "cuda" for b in bundles.values()))
        for batch in decoded_batches(todo, specs, cfg.batch_size, workers):
            out = _classify_batch(batch.inputs, router, bundles, stats, spec_of) if batch.n_good else None
            good = 0
            for path, error in zip(batch.paths, batch.errors):
                if error and cfg.strict:
                    f.flush()
                    raise DataError(f"{error} (--strict: stopped at the first unreadable file; the rows before it are "
                                    f"in {cfg.out_csv}: fix or remove the file and run again with --resume)")
                rel = inputs.rel(path)
                if error:  # never routed: the first source's row shape, source left to the error
                    b0 = next(iter(bundles.values()))
                    row = _routed_row(rel, b0, "", None, k_top, error, all_classes, None, None, None, False)
                    row[1] = AUTO
                    writer.writerow(row)
                    continue
                s, conf, p, score, rejected, novelty = (v[good] for v in out)
                b = bundles[router.sources[s]]
                label = inputs.labels.get(path.resolve()) if inputs.labels else true_label(Path(rel), b.classes)
                label = label if cfg.score and label in b.classes else ""
                st = stats[b.source]
                writer.writerow(_routed_row(rel, b, label, p, k_top, "", all_classes, float(conf),
                                            None if np.isnan(score) else float(score),
                                            st.threshold if st is not None else None, bool(rejected),
                                            None if np.isnan(novelty) else float(novelty)))
                good += 1
            f.flush()
            n_done += len(batch.paths)
            n_classified += batch.n_good
            if progress:
                progress(n_done, len(todo))
    seconds = time.perf_counter() - start
    extra = {"inputs": str(cfg.inputs), "precision": cfg.precision, "routing": "auto",
             "backends": {s: b.provider for s, b in bundles.items()}}
    scores = score_predictions(cfg.out_csv, n_wrong=cfg.n_wrong, extra=extra)
    runs = {}
    for s, sc in scores.items():
        b = bundles.get(s)
        runs[s] = SourceRun(s, b.provider if b else "not routed (unreadable)", (b.backend.notes if b else []) +
                            [n for n in notes if n.startswith(f"{s}:")], sc.n_rows, sc.n_errors, sc.n_unlabelled,
                            sc.metrics, sc.files)
    n_errors = sum(r.n_errors for r in runs.values())
    return InferResult(csv_path=cfg.out_csv, root=inputs.root, n_images=len(inputs.paths), n_errors=n_errors,
                       n_resumed=n_resumed, n_classified=n_classified, seconds=seconds, sources=runs)


def _classify_batch(inputs: list[np.ndarray], router, bundles: dict[str, Bundle], stats: dict[str, IdStats | None],
                    spec_of: dict[str, int]) -> tuple[np.ndarray, ...]:
    """Route the batch's readable images, run each source's model on its share (one call each),
    score them in distribution. Returns per image: source index, router confidence, probabilities
    (object array), id score (nan: none), rejected (by the router's novelty check or the model's),
    router novelty (nan: a router without the check)."""
    idx, conf, novelty = router.route_with_novelty(inputs[0])
    n = len(idx)
    probs = np.empty(n, dtype=object)
    score = np.full(n, np.nan)
    rejected = novelty > 1  # nan (no novelty model) compares False
    for i, s in enumerate(router.sources):
        sel = np.flatnonzero(idx == i)
        if not len(sel):
            continue
        b = bundles[s]
        logits, feats = b.predict_logits_and_features(inputs[spec_of[s]][sel])
        p = softmax(logits)
        for j, row in zip(sel, p):
            probs[j] = row
        if stats[s] is not None and feats is not None:
            score[sel], model_rejects = stats[s].rejects(feats)
            rejected[sel] |= model_rejects
    return idx, conf, probs, score, rejected, novelty
