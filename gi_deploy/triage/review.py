"""The review list a reader looks at: near-duplicates removed, the top frames of each finding, the
review budget (frames, per hour, % of the study, reading time) and the quality track."""

from __future__ import annotations

import numpy as np
from PIL import Image

from gi_deploy.errors import ConfigError
from gi_deploy.triage.temporal import Segment

HASH_SIZE = 8  # dHash: 8 x 8 = 64 bits
# Two frames whose 64-bit dHashes differ in at most this many bits are the same view: measured on the
# demo's capsule frames, a frame re-encoded or shifted by a pixel differs in 0-4 bits, two different
# frames of one section in 20-35 (half of 64 is what unrelated images give).
DUPLICATE_BITS = 6


def dhash(pixels: np.ndarray) -> int:
    """The 64-bit difference hash of an RGB image (H, W, 3) uint8: grey, resized to 9 x 8, one bit
    per horizontally adjacent pair (left brighter than right). Robust to re-encoding, scaling and
    small shifts; two views of different tissue differ in many bits."""
    grey = Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("L").resize(
        (HASH_SIZE + 1, HASH_SIZE), Image.Resampling.BILINEAR)
    a = np.asarray(grey, dtype=np.int16)
    bits = (a[:, :-1] > a[:, 1:]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bits that differ between 64-bit hashes (broadcasts; uint64 arrays or ints)."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return np.unpackbits(np.atleast_1d(x).view(np.uint8)).reshape(*np.atleast_1d(x).shape, 64).sum(-1)


def remove_near_duplicates(order: np.ndarray, hashes: np.ndarray, max_bits: int = DUPLICATE_BITS) -> np.ndarray:
    """Greedy near-duplicate removal: walk ``order`` (positions, best first) and keep a frame unless
    its hash is within ``max_bits`` of one already kept. ``hashes`` (N,) uint64 indexed by
    position. Returns the kept positions, in ``order``'s order."""
    kept: list[int] = []
    kept_hashes = np.zeros(0, np.uint64)
    for p in np.asarray(order, dtype=np.int64):
        if len(kept) and int(hamming(kept_hashes, hashes[p]).min()) <= max_bits:
            continue
        kept.append(int(p))
        kept_hashes = np.append(kept_hashes, np.uint64(hashes[p]))
    return np.asarray(kept, dtype=np.int64)


def flagged_positions(segments: list[Segment], n: int) -> np.ndarray:
    """(N,) bool: frames inside any segment."""
    flags = np.zeros(n, bool)
    for g in segments:
        flags[g.start:g.end + 1] = True
    return flags


def top_frames(segments: list[Segment], finding: str, score: np.ndarray, kept: set[int], k: int) -> list[dict]:
    """The ``k`` best frames of ``finding`` among ``kept`` (positions after near-duplicate removal)
    inside its segments, by score: ``{"position", "segment", "score"}`` with the segment's index
    in ``segments``, best first."""
    out = []
    for si, g in enumerate(segments):
        if g.finding != finding:
            continue
        for p in range(g.start, g.end + 1):
            if p in kept:
                out.append({"position": p, "segment": si, "score": float(score[p])})
    return sorted(out, key=lambda r: (-r["score"], r["position"]))[:k]


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
    return {"reduced_view": int(reduced.sum()), "refused": int(rejected.sum()), "poor": int(poor.sum()),
            "poor_share": float(poor.mean()) if n else 0.0, "flags": poor}
