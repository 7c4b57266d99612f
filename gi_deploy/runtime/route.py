"""``gi-deploy infer INPUT --source auto``: each image goes to the model of the source the router
says it came from, and is refused when the router's novelty check or that model's in-distribution
check says no model here was trained for it. Torch-free: the router (core/router.py) and the check
(core/ood.py) are numpy. Only routing lives here: the job (plan, lock, rows, resume, summary) is
runtime/job.py's, the same as every other mode's.

One CSV row per image; ``source`` is the routed source, and the strategy's own columns are:
``router_confidence`` the router's probability for it; ``id_score`` the chosen model's Mahalanobis
score and ``id_threshold`` its bound; ``rejected`` 1 with a ``reason`` (and no diagnosis: empty
prediction and probabilities) when refused.
"""

from __future__ import annotations

import logging

import numpy as np

from gi_deploy.core.bundles import list_bundles
from gi_deploy.core.metrics import softmax
from gi_deploy.core.ood import IdStats, load_id_stats
from gi_deploy.core.router import ROUTER_FILE, Router, load_router
from gi_deploy.errors import BundleError, ConfigError
from gi_deploy.runtime.job import Answer, InferConfig, Strategy
from gi_deploy.runtime.loader import bundle_identity, open_for

log = logging.getLogger(__name__)

AUTO = "auto"
ROUTE_COLUMNS = ("router_confidence", "id_score", "id_threshold", "rejected", "reason")


def is_auto(sources: list[str] | None) -> bool:
    """Whether ``--source`` asks for routing; ``auto`` beside named sources is a ConfigError."""
    if not sources or AUTO not in sources:
        return False
    if len(set(sources)) > 1:
        raise ConfigError(
            f"--source auto routes every image itself; do not name other sources beside it (got {', '.join(sources)})"
        )
    return True


def refusal_reason(source: str, novelty: float | None, score: float | None, threshold: float | None) -> str:
    """Why an image is refused ("" when it is not): the router's check first (no source looks like
    it), then the routed model's."""
    if novelty is not None and novelty > 1:
        return f"not like any source's frames (router features): novelty {novelty:.2f} x the nearest source's threshold"
    if score is not None and threshold is not None and score > threshold:
        return f"out of distribution for {source}'s model: score {score:.1f} over its threshold {threshold:.1f}"
    return ""


class Routed(Strategy):
    """The router picks each image's source; that source's model answers, or the image is refused.
    One row per image (slot ``auto``); ``specs[0]`` is the router's thumbnail."""

    slots = (AUTO,)
    columns = ROUTE_COLUMNS

    def __init__(self, router: Router, bundles: dict, stats: dict[str, IdStats | None], notes: list[str]):
        self.router, self.bundles, self.stats, self.notes = router, bundles, stats, notes
        self.specs = tuple(dict.fromkeys([router.spec, *(b.preprocess for b in bundles.values())]))
        self.spec_of = {s: self.specs.index(b.preprocess) for s, b in bundles.items()}
        self.classes = list(dict.fromkeys(c for b in bundles.values() for c in b.classes))

    @classmethod
    def open(cls, cfg: InferConfig, load: bool = True) -> Routed:
        """The deploy folder's router and every source it routes to (loaded, or manifests only).
        Raises BundleError when there is no router, or it routes to a source with no bundle."""
        router = load_router(cfg.deploy_dir)
        missing = [s for s in router.sources if s not in list_bundles(cfg.deploy_dir)]
        if missing:
            raise BundleError(
                f"the router of {cfg.deploy_dir} routes to {', '.join(missing)}, which has no bundle "
                f"there any more; re-export it, or rewrite the router: gi-deploy export --router --out "
                f"{cfg.deploy_dir}"
            )
        bundles, stats, notes = {}, {}, []
        for s in router.sources:
            d = cfg.deploy_dir / s
            b = open_for(cfg, d, load)
            bundles[s] = b
            stats[s] = load_id_stats(b.path, b.manifest)
            written_for = router.manifest.bundles.get(s)
            if written_for != b.manifest.export_key:  # the router still routes; say it was fitted for another export
                notes.append(
                    f"{s}: the router was written beside export {str(written_for)[:12]} of this source, the bundle "
                    f"is now export {b.manifest.export_key[:12]}; rewrite the router to match: gi-deploy export "
                    f"--router --out {cfg.deploy_dir}"
                )
            if stats[s] is None:
                notes.append(
                    f"{s}: its bundle has no in-distribution statistics (exported before gi-deploy learnt "
                    f"routing, or without its training images): images routed to it are never refused; "
                    f"re-export it with `gi-deploy export {s} --force`"
                )
            elif load and b.backend.run_features is None:
                notes.append(
                    f"{s}: the {b.backend.name} model gives no pooled features: images routed to it are never refused"
                )
        for n in notes:
            log.warning(n)
        return cls(router, bundles, stats, notes)

    def slot_of(self, source_column: str) -> str:
        return AUTO

    def identities(self, precision: str) -> dict[str, dict]:
        m = self.router.manifest  # sealed: the source order, thresholds and router.npz's sha256 are covered
        router = {
            "bundle": str(self.router.path),
            "export_key": m.seal.get("sha256", ""),
            "precision": "router",
            "content_sha256": m.files[ROUTER_FILE].sha256,
        }
        return {**{s: bundle_identity(b, precision) for s, b in self.bundles.items()}, "_router": router}

    def backends(self) -> dict[str, tuple[str, list[str]]]:
        return {
            s: (b.provider, list(b.backend.notes) + [n for n in self.notes if n.startswith(f"{s}:")])
            for s, b in self.bundles.items()
        }

    def classify(self, inputs: list[np.ndarray]) -> list[list[Answer]]:
        """Route the readable images, run each source's model on its share (one call each), score
        them in distribution; refuse by the router's novelty check or the routed model's."""
        idx, conf, novelty = self.router.route_with_novelty(inputs[0])
        answers: list[Answer | None] = [None] * len(idx)
        for i, s in enumerate(self.router.sources):
            sel = np.flatnonzero(idx == i)
            if not len(sel):
                continue
            logits, feats = self.bundles[s].predict_logits_and_features(inputs[self.spec_of[s]][sel])
            probs = softmax(logits)
            st = self.stats[s]
            scores = np.full(len(sel), np.nan)
            model_rejects = np.zeros(len(sel), dtype=bool)
            if st is not None and feats is not None:
                scores, model_rejects = st.rejects(feats)
            for k, j in enumerate(sel):
                nov = None if np.isnan(novelty[j]) else float(novelty[j])
                score = None if np.isnan(scores[k]) else float(scores[k])
                threshold = st.threshold if st is not None else None
                rejected = bool(model_rejects[k]) or (nov is not None and nov > 1)
                reason = refusal_reason(s, nov, score, threshold) if rejected else ""
                extra = {
                    "router_confidence": f"{conf[j]:.6f}",
                    "id_score": "" if score is None else f"{score:.3f}",
                    "id_threshold": "" if threshold is None else f"{threshold:.3f}",
                    "rejected": "1" if rejected else "0",
                    "reason": reason,
                }
                answers[j] = Answer(s, None if rejected else probs[k], extra, rejected, reason)
        return [[a] for a in answers]
