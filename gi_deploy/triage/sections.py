"""Sections of the gut (stomach -> small bowel -> colon) from the landmark evidence, with that order
enforced, and the transit times.

Per-frame argmax cannot do this: the capsule sees the pylorus again after passing it, a frame of
the ileum can look like the valve before the pylorus is passed, and a landmark class fires on one
frame in a thousand by chance. So the two change points are chosen together: ``b1`` (first small
bowel frame) and ``b2`` (first colon frame) maximise ``e1[b1] + e2[b2]`` subject to ``b1 < b2``,
where ``e1``/``e2`` are the smoothed scores of the two landmark classes (an exact search in O(N)
with a running maximum). A change point whose evidence stays under ``min_evidence`` is not
found: without the second, the caecum was never reached and the study is incomplete.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gi_deploy.triage.roles import SECTIONS


@dataclass
class Sections:
    """``bounds``: the positions (into the video's frame sequence) where small bowel and colon begin,
    None when not found; ``evidence`` the landmark score at each; ``times`` of the frames."""

    bounds: tuple[int | None, int | None]
    evidence: tuple[float | None, float | None]
    n_frames: int
    incomplete: bool
    reason: str

    def labels(self) -> np.ndarray:
        """(N,) int8 section per frame: 0 stomach, 1 small bowel, 2 colon, -1 undetermined: every
        frame before a small-bowel change point that was not found (the capsule may have stayed in
        the stomach, or the model has no landmark classes: not guessed as stomach)."""
        out = np.full(self.n_frames, -1, np.int8)
        b1, b2 = self.bounds
        if b1 is not None:
            out[:b1] = 0
            out[b1:] = 1
        if b2 is not None:
            out[b2:] = 2
        return out

    def transit(self, times: np.ndarray) -> dict:
        """Transit times in seconds: gastric (first frame to b1), small bowel (b1 to b2), colon
        (b2 to the last frame); None where a bound is missing."""
        b1, b2 = self.bounds
        t0, tn = float(times[0]), float(times[-1])
        return {
            "first_small_bowel_time": None if b1 is None else float(times[b1]),
            "first_colon_time": None if b2 is None else float(times[b2]),
            "gastric_s": None if b1 is None else float(times[b1]) - t0,
            "small_bowel_s": None if b1 is None or b2 is None else float(times[b2] - times[b1]),
            "colon_s": None if b2 is None else tn - float(times[b2]),
        }

    def to_dict(self, times: np.ndarray, frames: np.ndarray) -> dict:
        b1, b2 = self.bounds
        return {
            "first_small_bowel_frame": None if b1 is None else int(frames[b1]),
            "first_colon_frame": None if b2 is None else int(frames[b2]),
            "evidence": list(self.evidence),
            "incomplete": self.incomplete,
            "reason": self.reason,
            "sections": list(SECTIONS),
            **self.transit(times),
        }


def _best_ordered(e1: np.ndarray, e2: np.ndarray) -> tuple[int, int]:
    """argmax over b1 < b2 of e1[b1] + e2[b2] (the first such pair on ties); N >= 2."""
    run = np.maximum.accumulate(e1[:-1])  # run[k] = max e1[0..k]
    arg = np.zeros(len(run), np.int64)  # first index of that maximum
    best = 0
    for k in range(1, len(run)):  # O(N): the index of the running maximum, first on ties
        if e1[k] > e1[best]:
            best = k
        arg[k] = best
    total = run + e2[1:]  # b2 = k + 1, b1 = arg[k]
    k = int(np.argmax(total))
    return int(arg[k]), k + 1


def find_sections(landmark_scores: np.ndarray, min_evidence: float = 0.5) -> Sections:
    """Sections from ``landmark_scores`` (N, L), L in 0..2: the smoothed scores of the ordered
    landmark classes (pylorus, ileocecal valve). See the module docstring."""
    n = len(landmark_scores)
    nl = landmark_scores.shape[1] if landmark_scores.ndim == 2 else 0
    if nl == 0 or n == 0:
        return Sections(
            (None, None),
            (None, None),
            n,
            True,
            "the model has no landmark classes: sections and the caecum cannot be found (give --landmark)",
        )
    e1 = landmark_scores[:, 0].astype(np.float64)
    if nl == 1:
        b = int(np.argmax(e1))
        ok = e1[b] >= min_evidence
        return Sections(
            (b if ok else None, None),
            (float(e1[b]) if ok else None, None),
            n,
            True,
            "one landmark class only: the colon boundary cannot be found (give a second --landmark)",
        )
    e2 = landmark_scores[:, 1].astype(np.float64)
    if n >= 2:
        b1, b2 = _best_ordered(e1, e2)
        if e1[b1] >= min_evidence and e2[b2] >= min_evidence:
            return Sections((b1, b2), (float(e1[b1]), float(e2[b2])), n, False, "")
    # one of the two is missing: each alone, the other not found
    b2 = int(np.argmax(e2))
    if e2[b2] >= min_evidence:  # the valve was seen, the pylorus not (with its score before the valve)
        b1 = int(np.argmax(e1[:b2])) if b2 > 0 else None
        found1 = b1 is not None and e1[b1] >= min_evidence
        return Sections(
            (b1 if found1 else None, b2),
            (float(e1[b1]) if found1 else None, float(e2[b2])),
            n,
            False,
            "" if found1 else "the pylorus was not seen: where the small bowel begins is undetermined",
        )
    b1 = int(np.argmax(e1))
    found1 = e1[b1] >= min_evidence
    return Sections(
        (b1 if found1 else None, None),
        (float(e1[b1]) if found1 else None, None),
        n,
        True,
        f"the ileocecal valve was never seen (landmark score < {min_evidence}): the caecum was not "
        "reached, or the capsule passed it unseen; incomplete study",
    )
