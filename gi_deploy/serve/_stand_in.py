"""A stand-in for the job pipeline's classification strategies (runtime/job.py, issue 21: ``Answer``,
``Strategy``, ``open_strategy``), over the runtime's own pieces (runtime.loader.load_bundle,
core.metrics.softmax, runtime.route), until that module lands on main. It follows PIPELINE.md's
contract so that switching is one import line in serve/models.py; delete this file then.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gi_deploy.core.bundles import resolve_bundle_dirs
from gi_deploy.core.metrics import softmax
from gi_deploy.runtime.infer import InferConfig, specs_of
from gi_deploy.runtime.loader import Bundle, load_bundle
from gi_deploy.runtime.route import ROUTE_COLUMNS, _classify_batch, is_auto, open_routed, refusal_reason, routed_specs


@dataclass
class Answer:
    """One model's answer for one image (runtime/job.py's)."""

    source: str
    probs: np.ndarray | None
    extra: dict[str, str] = field(default_factory=dict)
    rejected: bool = False
    reason: str = ""


class _PerSource:
    """One row per selected source."""

    columns: tuple[str, ...] = ()

    def __init__(self, bundles: list[Bundle]):
        self.bundles = {b.source: b for b in bundles}
        self.slots = tuple(self.bundles)
        self.specs = specs_of(bundles)
        self.classes = list(dict.fromkeys(c for b in bundles for c in b.classes))
        self._spec_of = [self.specs.index(b.preprocess) for b in bundles]

    def classify(self, inputs: list[np.ndarray]) -> list[list[Answer]]:
        per_slot = [softmax(b.predict_logits(inputs[j])) for b, j in zip(self.bundles.values(), self._spec_of)]
        n = len(per_slot[0])
        return [[Answer(s, p[i]) for s, p in zip(self.slots, per_slot)] for i in range(n)]

    def backends(self) -> dict[str, tuple[str, list[str]]]:
        return {s: (b.provider, b.backend.notes) for s, b in self.bundles.items()}


class _Routed:
    """The router, then the routed source's model, with the OOD refusal."""

    slots = ("auto",)
    columns = ROUTE_COLUMNS

    def __init__(self, cfg: InferConfig):
        self.router, self.bundles, self._stats, self._notes = open_routed(cfg)
        self.specs, self._spec_of = routed_specs(self.router, self.bundles)
        self.classes = list(dict.fromkeys(c for b in self.bundles.values() for c in b.classes))

    def classify(self, inputs: list[np.ndarray]) -> list[list[Answer]]:
        idx, conf, probs, score, rejected, novelty = _classify_batch(inputs, self.router, self.bundles, self._stats,
                                                                     self._spec_of)
        out = []
        for i in range(len(idx)):
            s = self.router.sources[idx[i]]
            st = self._stats[s]
            sc = None if np.isnan(score[i]) else float(score[i])
            nov = None if np.isnan(novelty[i]) else float(novelty[i])
            reason = refusal_reason(s, nov, sc, st.threshold if st else None) if rejected[i] else ""
            extra = {"router_confidence": f"{conf[i]:.6f}", "id_score": "" if sc is None else f"{sc:.3f}",
                     "id_threshold": "" if st is None else f"{st.threshold:.3f}",
                     "rejected": "1" if rejected[i] else "0", "reason": reason}
            out.append([Answer(s, None if rejected[i] else probs[i], extra, bool(rejected[i]), reason)])
        return out

    def backends(self) -> dict[str, tuple[str, list[str]]]:
        return {s: (b.provider, b.backend.notes + [n for n in self._notes if n.startswith(f"{s}:")])
                for s, b in self.bundles.items()}


def open_strategy(cfg: InferConfig):
    """PerSource or Routed, as runtime/job.py's open_strategy."""
    if is_auto(cfg.sources):
        return _Routed(cfg)
    return _PerSource([load_bundle(d, cfg.precision, cfg.device, backend=cfg.backend, threads=cfg.threads,
                                   compile=cfg.compile, batch_size=cfg.batch_size)
                       for d in resolve_bundle_dirs(cfg.deploy_dir, cfg.sources)])
