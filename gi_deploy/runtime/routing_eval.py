"""``gi-deploy evaluate --routing``: how well ``--source auto`` does on labelled sources.

Every image of every source's labelled test set (and of a ``--ood`` folder of images no source
covers) goes through the router and through every source's model, so one pass gives:

- the routing confusion matrix (true source x routed source) and routing accuracy;
- each single model's accuracy on the mixed folder (the seed paper's Table 1 on one folder), the
  accuracy of each image through its own source's model, and of routed inference (a refused
  image counts as not a correct diagnosis; the accuracy over accepted images is given too);
- out-of-distribution detection with the score ``infer --source auto`` refuses on: the larger of
  the router's novelty ratio (core/router.py: Mahalanobis in router-feature space over its
  threshold, min over sources) and the routed model's ratio (Mahalanobis over its calibrated
  threshold), so an image is refused exactly when the score is over 1. AUROC of in-distribution
  test images vs the ``--ood`` images, FPR at 95% TPR (the share of OOD images accepted when the
  bound accepts 95% of the test images), and the rates at the thresholds really used, with how
  many each check refused; and the same per OOD set (``ood_by_set``) when ``--ood`` holds
  sub-folders (one per kind of frame, e.g. ``write_near_ood``'s), since one pooled AUROC hides a
  set the check misses. A router without the novelty check (written before it) leaves the
  model's ratio alone.

Written: ``routing.csv`` (one row per image, every number the metrics come from) and
``routing.json``. Torch-free.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy._io import write_json
from gi_deploy.core.metrics import binary_roc_auc, confusion_matrix
from gi_deploy.errors import ConfigError, DataError
from gi_deploy.runtime.cross import _truth, default_test_set
from gi_deploy.runtime.decode.cpu import decoded_batches
from gi_deploy.runtime.infer import InferConfig
from gi_deploy.runtime.inputs import collect_inputs
from gi_deploy.runtime.route import Routed

OOD = "(ood)"


@dataclass
class RoutingResult:
    report: dict
    files: dict[str, Path]


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> dict:
    """AUROC (OOD positive, higher score = more OOD) and the false-positive rate at ``tpr``: the
    share of OOD scores at or under the in-distribution scores' ``tpr`` quantile (accepted)."""
    id_scores, ood_scores = np.asarray(id_scores, float), np.asarray(ood_scores, float)
    if not len(id_scores) or not len(ood_scores):
        return {"auroc": None, "fpr_at_95tpr": None, "n_id": int(len(id_scores)), "n_ood": int(len(ood_scores))}
    thr = float(np.quantile(id_scores, tpr, method="higher"))
    auroc = binary_roc_auc(
        np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))].astype(bool), np.r_[id_scores, ood_scores]
    )
    return {
        "auroc": auroc,
        "fpr_at_95tpr": float((ood_scores <= thr).mean()),
        "threshold_at_95tpr": thr,
        "n_id": int(len(id_scores)),
        "n_ood": int(len(ood_scores)),
    }


def _sets(
    deploy_dir: Path, sources: list[str], tests: dict[str, str | Path] | None, ood: Path | None, scratch: Path
) -> list[tuple[str, Path, str]]:
    """(true source or OOD, image path, label) for every image."""
    tests = dict(tests or {s: default_test_set(deploy_dir, s, scratch) for s in sources})
    unknown = [s for s in tests if s not in sources]
    if unknown:
        raise ConfigError(
            f"--test names {', '.join(unknown)}, which the router does not route to ({', '.join(sources)})"
        )
    items = []
    for s, where in tests.items():
        inputs = collect_inputs(where)
        truth = _truth(where)
        items += [(s, p, truth[inputs.rel(p)]) for p in inputs.paths]
    if ood is not None:  # an OOD image's "label" is its set: the first folder under --ood ("." for its top level)
        found = collect_inputs(ood)
        items += [(OOD, p, found.rel(p).split("/")[0] if "/" in found.rel(p) else ".") for p in found.paths]
    if not items:
        raise DataError("evaluate --routing: no images in the test sets")
    return items


def evaluate_routing(
    deploy_dir: Path,
    out_dir: Path,
    tests: dict[str, str | Path] | None = None,
    ood: Path | None = None,
    batch_size: int = 32,
    workers: int = 0,
    backend: str = "auto",
    precision: str = "fp32",
    device: str = "auto",
) -> RoutingResult:
    """Route and classify every test image (see the module docstring); write routing.csv and
    routing.json into ``out_dir``. Raises BundleError without a router, ConfigError for a test set
    of a source the router does not know, DataError for unreadable images."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = InferConfig(
        inputs=".", deploy_dir=deploy_dir, backend=backend, precision=precision, device=device, workers=workers
    )
    routed = Routed.open(cfg)
    router, bundles, stats, notes = routed.router, routed.bundles, routed.stats, routed.notes
    sources = router.sources
    items = _sets(deploy_dir, sources, tests, ood, out_dir)
    specs, spec_of = routed.specs, routed.spec_of
    rows = []
    it = iter(items)
    for batch in decoded_batches([p for _, p, _ in items], specs, batch_size, workers):
        meta = [next(it) for _ in batch.paths]
        bad = [(p, e) for p, e in zip(batch.paths, batch.errors) if e]
        if bad:
            raise DataError(f"evaluate --routing: {bad[0][1]}; every test image must be readable")
        idx, conf, novelty = router.route_with_novelty(batch.inputs[0])
        preds, ratios = {}, {}
        for s, b in bundles.items():
            logits, feats = b.predict_logits_and_features(batch.inputs[spec_of[s]])
            preds[s] = [b.classes[i] for i in logits.argmax(axis=1)]
            ratios[s] = (
                stats[s].score(feats) / stats[s].threshold
                if stats[s] is not None and feats is not None
                else np.full(len(logits), np.nan)
            )
        for j, (true_source, path, label) in enumerate(meta):
            routed = sources[idx[j]]
            combined = float(np.fmax(ratios[routed][j], novelty[j]))  # nan only when neither check exists
            is_ood = true_source == OOD
            rows.append(
                {
                    "path": str(path),
                    "true_source": true_source,
                    "label": "" if is_ood else label,
                    "ood_set": label if is_ood else "",
                    "routed": routed,
                    "router_confidence": float(conf[j]),
                    "rejected": bool(combined > 1),
                    "router_novelty": float(novelty[j]),
                    "ood_score": combined,
                    **{f"pred:{s}": preds[s][j] for s in sources},
                    **{f"id_ratio:{s}": float(ratios[s][j]) for s in sources},
                }
            )
    report = routing_report(rows, sources)
    report["notes"] = notes
    files = {"csv": out_dir / "routing.csv", "json": out_dir / "routing.json"}
    with open(files["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_json(files["json"], report)
    return RoutingResult(report, files)


def _ood_score(row: dict) -> float:
    """The refusal score of a routing.csv row: ``ood_score`` (router novelty and model combined), or
    the routed model's ratio for rows without it."""
    v = row.get("ood_score")
    return float(row[f"id_ratio:{row['routed']}"]) if v is None or v == "" else float(v)


def _by_router(row: dict) -> bool:
    return float(row.get("router_novelty", np.nan)) > 1


def _ood_entry(id_scores: np.ndarray, ood: list[dict]) -> dict:
    """AUROC / FPR95 of ``ood``'s rows against the test images' scores, and who refused them at the thresholds."""
    scores = np.array([_ood_score(r) for r in ood], float)
    return {
        **ood_metrics(id_scores, scores),
        "ood_rejected": int((scores > 1).sum()),
        "ood_rejected_share": float((scores > 1).mean()),
        "ood_rejected_by_router": sum(_by_router(r) for r in ood),
        "ood_rejected_by_model": sum(float(r[f"id_ratio:{r['routed']}"]) > 1 for r in ood),
    }


def routing_report(rows: list[dict], sources: list[str]) -> dict:
    """The numbers of ``evaluate --routing`` from its per-image rows (routing.csv's columns)."""
    ind = [r for r in rows if r["true_source"] != OOD]
    ood = [r for r in rows if r["true_source"] == OOD]
    report: dict = {"sources": sources, "n_images": len(ind), "n_ood": len(ood)}
    if ind:
        t = np.array([sources.index(r["true_source"]) for r in ind])
        p = np.array([sources.index(r["routed"]) for r in ind])
        label = np.array([r["label"] for r in ind])
        rejected = np.array([r["rejected"] for r in ind])
        routed_pred = np.array([r[f"pred:{r['routed']}"] for r in ind])
        own_pred = np.array([r[f"pred:{r['true_source']}"] for r in ind])
        correct = (routed_pred == label) & ~rejected
        report.update(
            {
                "routing_confusion": {
                    "rows_true": sources,
                    "cols_routed": sources,
                    "matrix": confusion_matrix(t, p, len(sources)).tolist(),
                },
                "routing_accuracy": float((t == p).mean()),
                "single_model_accuracy": {
                    s: float((np.array([r[f"pred:{s}"] for r in ind]) == label).mean()) for s in sources
                },
                "single_model_accuracy_by_source": {
                    s: {
                        ts: float(np.mean([r[f"pred:{s}"] == r["label"] for r in ind if r["true_source"] == ts]))
                        for ts in sources
                        if any(r["true_source"] == ts for r in ind)
                    }
                    for s in sources
                },
                "own_model_accuracy": float((own_pred == label).mean()),
                "routed_accuracy_by_source": {
                    ts: float(correct[t == i].mean()) for i, ts in enumerate(sources) if (t == i).any()
                },
                "routed_accuracy": float(correct.mean()),
                "routed_accuracy_accepted": float(correct[~rejected].mean()) if (~rejected).any() else None,
                # the same answered images through their own source's model: what routing alone costs
                "own_model_accuracy_accepted": float((own_pred == label)[~rejected].mean())
                if (~rejected).any()
                else None,
                "id_rejected": int(rejected.sum()),
                "id_rejected_share": float(rejected.mean()),
            }
        )
    if ind:
        report["id_rejected_by_router"] = sum(_by_router(r) for r in ind)
    id_scores = np.array([_ood_score(r) for r in ind], float)
    ood_scores = np.array([_ood_score(r) for r in ood], float)
    combined = any(not np.isnan(float(r.get("router_novelty", np.nan))) for r in rows)
    if ood and not np.isnan(np.r_[id_scores, ood_scores]).any():
        report["ood"] = {
            **_ood_entry(id_scores, ood),
            "score": (
                "max(router novelty, routed model's Mahalanobis / its threshold)"
                if combined
                else "routed model's Mahalanobis / its threshold"
            ),
        }
        sets = sorted({r.get("ood_set") or "." for r in ood})
        if sets != ["."]:
            report["ood_by_set"] = {
                k: _ood_entry(id_scores, [r for r in ood if (r.get("ood_set") or ".") == k]) for k in sets
            }
    elif ood:
        report["ood"] = {"auroc": None, "note": "a routed-to bundle has no in-distribution statistics; re-export it"}
    return report
