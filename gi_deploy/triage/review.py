"""The review list a reader looks at: near-duplicates removed, the top frames of each finding, the
review budget (frames, per hour, % of the study, reading time) and the quality track."""

from __future__ import annotations

import numpy as np
from PIL import Image

from gi_deploy.errors import ConfigError
from gi_deploy.triage.temporal import Segment

HASH_SIZE = 16  # dHash: 16 x 16 = 256 bits
HASH_BYTES = HASH_SIZE * HASH_SIZE // 8
# The centre square the hash reads: inside a capsule's round field of view, so the black border and
# the vignetting, the same in every frame, do not make two different frames look alike.
HASH_CROP = 0.6
# Two frames whose hashes differ in at most this many of 256 bits are the same view. Measured on the
# demo's synthetic study after H.264 (tests/triage/test_review_hash.py keeps it honest): a stalled
# capsule's repeated frames differ in 0-8 bits, two different frames in 49 or more (115 on average).
DUPLICATE_BITS = 24


def dhash(pixels: np.ndarray) -> np.ndarray:
    """The 256-bit difference hash of an RGB image (H, W, 3) uint8, packed as (32,) uint8: the
    centre ``HASH_CROP`` square, grey, resized to 17 x 16, one bit per horizontally adjacent pair
    (left brighter than right). Robust to re-encoding, noise and scaling; different tissue
    differs in many bits."""
    a = np.asarray(pixels, dtype=np.uint8)
    h, w = a.shape[:2]
    ch, cw = max(1, int(h * HASH_CROP / 2)), max(1, int(w * HASH_CROP / 2))
    crop = a[h // 2 - ch : h // 2 + ch, w // 2 - cw : w // 2 + cw]
    grey = Image.fromarray(crop).convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.BILINEAR)
    g = np.asarray(grey, dtype=np.int16)
    return np.packbits((g[:, :-1] > g[:, 1:]).ravel())


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between packed hashes: ``a`` (..., 32) against ``b`` (32,) or (..., 32)."""
    return np.unpackbits(np.bitwise_xor(np.asarray(a, np.uint8), np.asarray(b, np.uint8)), axis=-1).sum(-1)


def remove_near_duplicates(order: np.ndarray, hashes: np.ndarray, max_bits: int = DUPLICATE_BITS) -> np.ndarray:
    """Greedy near-duplicate removal: walk ``order`` (positions, best first) and keep a frame unless
    its hash is within ``max_bits`` of one already kept. ``hashes`` (N, 32) uint8 indexed by
    position. Returns the kept positions, in ``order``'s order."""
    kept: list[int] = []
    kept_hashes = np.zeros((len(order), HASH_BYTES), np.uint8)
    for p in np.asarray(order, dtype=np.int64):
        if kept and int(hamming(kept_hashes[: len(kept)], hashes[p]).min()) <= max_bits:
            continue
        kept_hashes[len(kept)] = hashes[p]
        kept.append(int(p))
    return np.asarray(kept, dtype=np.int64)


def flagged_positions(segments: list[Segment], n: int) -> np.ndarray:
    """(N,) bool: frames inside any segment."""
    flags = np.zeros(n, bool)
    for g in segments:
        flags[g.start : g.end + 1] = True
    return flags


def top_frames(segments: list[Segment], finding: str, score: np.ndarray, kept: set[int], k: int) -> list[dict]:
    """The ``k`` best frames of ``finding`` among ``kept`` (positions after near-duplicate removal)
    inside its segments: ``{"position", "segment", "score"}`` with the segment's index in
    ``segments``. Every segment's best frame comes before any segment's second best (a reader sees
    each suspected segment before more of one), then by score."""
    out = []
    for si, g in enumerate(segments):
        if g.finding != finding:
            continue
        mine = sorted((p for p in range(g.start, g.end + 1) if p in kept), key=lambda p: (-score[p], p))
        out += [{"position": p, "segment": si, "score": float(score[p]), "_rank": r} for r, p in enumerate(mine)]
    out.sort(key=lambda r: (r["_rank"], -r["score"], r["position"]))
    return [{k_: v for k_, v in r.items() if k_ != "_rank"} for r in out[:k]]


def review_budget(n_frames: int, duration_s: float, n_flagged: int, n_review: int, frames_per_minute: float) -> dict:
    """The reader's budget: frames flagged (in any segment) and left to review after near-duplicate
    removal, per hour of video and as % of the study, and the reading time of the review list at
    ``frames_per_minute``. Raises ConfigError when the reading speed is not positive."""
    if frames_per_minute <= 0:
        raise ConfigError(f"reading speed must be > 0 frames per minute, got {frames_per_minute}")
    hours = duration_s / 3600.0
    return {
        "n_frames": n_frames,
        "duration_s": duration_s,
        "flagged_frames": n_flagged,
        "review_frames": n_review,
        "flagged_per_hour": n_flagged / hours if hours > 0 else None,
        "review_per_hour": n_review / hours if hours > 0 else None,
        "flagged_percent": 100.0 * n_flagged / n_frames if n_frames else 0.0,
        "review_percent": 100.0 * n_review / n_frames if n_frames else 0.0,
        "frames_per_minute": frames_per_minute,
        "reading_minutes": n_review / frames_per_minute,
    }


def quality_track(probs: np.ndarray, quality: tuple[int, ...], rejected: np.ndarray, threshold: float = 0.5) -> dict:
    """The share of frames a reader cannot trust: reduced view (the quality classes' summed
    probability >= ``threshold``) and refused as out of distribution (``rejected`` (N,) bool, from
    ``--source auto``). ``probs`` (N, C); returns counts, shares and the (N,) bool per-frame flag."""
    n = len(probs)
    reduced = (probs[:, list(quality)].sum(1) >= threshold) if quality and n else np.zeros(n, bool)
    rejected = np.asarray(rejected, bool)
    poor = reduced | rejected
    return {
        "reduced_view": int(reduced.sum()),
        "refused": int(rejected.sum()),
        "poor": int(poor.sum()),
        "poor_share": float(poor.mean()) if n else 0.0,
        "flags": poor,
    }
