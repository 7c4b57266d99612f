"""Goal verdicts for the scripts under benchmarks/: one line per goal saying met / NOT met, and an exit code.

    goals = Goals()
    goals.at_least("compiled vs eager, model only", ratio, 1.8, "x")
    ...
    raise SystemExit(goals.finish(check=args.check))

A goal whose figure was not measured (``None``: its step failed or was skipped) is "NOT measured" and counts
as not met: a script cannot pass ``--check`` on a figure it does not have.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Goals:
    results: list[tuple[str, bool]] = field(default_factory=list)

    def _say(self, name: str, value: float | None, op: str, target: float, unit: str, fmt: str) -> bool:
        if value is None:
            print(f"goal {name} {op} {target:{fmt}}{unit}: NOT measured", flush=True)
            self.results.append((name, False))
            return False
        met = value >= target if op == ">=" else value <= target
        print(f"goal {name} {op} {target:{fmt}}{unit}: {value:{fmt}}{unit} ({'met' if met else 'NOT met'})", flush=True)
        self.results.append((name, met))
        return met

    def at_least(self, name: str, value: float | None, target: float, unit: str = "", fmt: str = ".2f") -> bool:
        return self._say(name, value, ">=", target, unit, fmt)

    def at_most(self, name: str, value: float | None, target: float, unit: str = "", fmt: str = ".2f") -> bool:
        return self._say(name, value, "<=", target, unit, fmt)

    def finish(self, check: bool) -> int:
        """Print the summary line; the exit code: 1 with ``check`` when a goal is not met, else 0."""
        missed = [n for n, ok in self.results if not ok]
        print(
            f"goals: {len(self.results) - len(missed)}/{len(self.results)} met"
            + (f"; NOT met: {'; '.join(missed)}" if missed else ""),
            flush=True,
        )
        return 1 if check and missed else 0
