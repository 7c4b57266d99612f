"""Capsule-video triage: per-frame predictions (through the runtime's job pipeline) become a study:
smoothed scores, suspected-finding segments, sections and transit times, a short review list, the
review budget, a quality track, a report and an evaluation against Kvasir-Capsule labels.

Imports ``runtime`` and ``core`` only (never torch). PyAV (the ``video`` extra) is imported only in
``video.py``."""
