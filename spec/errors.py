"""User-facing validation errors: every problem names the field, the offending value and a fix."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecIssue:
    field: str          # dotted path in the spec file, e.g. "parallel.tp"
    value: object       # what the user wrote (or the derived value that is wrong)
    problem: str        # what is wrong, in one sentence
    fix: str = ""       # what to write instead; nearest valid values where there are some

    def __str__(self) -> str:
        text = f"{self.field} = {self.value!r}: {self.problem}"
        return f"{text} Fix: {self.fix}" if self.fix else text


class SpecError(ValueError):
    """Raised at the boundary (loading/validating a spec). Carries every issue found, not just the first."""

    def __init__(self, issues: list[SpecIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))

    def fields(self) -> list[str]:
        return [i.field for i in self.issues]


def nearest(value: int, candidates: list[int], k: int = 3) -> list[int]:
    """The k valid values closest to `value` (used in fix hints)."""
    return sorted(sorted(set(candidates), key=lambda c: (abs(c - value), c))[:k])


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
