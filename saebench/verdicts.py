"""The one verdict vocabulary: every word a result row's `verdict` (and a gate's
`vs_baseline`) can carry, its mark and meaning, and which words fail a run or a gate.

Suites, `evaluate()`, reports, gates and the leaderboard all read these tuples, so a new
verdict is one line here. A check without a threshold is `measured`: a measurement, never
shown as a pass. No saebench import here.

    >>> MARKS["measured"], "measured" in FAILING
    ('📏', False)
"""

from __future__ import annotations

MEANINGS: dict[str, str] = {
    "pass": "meets its threshold",
    "fail": "misses its threshold",
    "measured": "measured; no threshold judges it",
    "xfail": "expected to fail, and did",
    "xpass": "expected to fail, but passed",
    "error": "could not be computed",
    "unstable": "its denominator is not usable",
    "empty": "nothing was measured",
    "skipped": "not run",
    "regression": "worse than its baseline beyond tolerance and noise",
    "noisy": "worse than its baseline beyond tolerance, but within noise",
}
"""Every verdict of a result row, in the order tables list them, with its meaning."""

MARKS: dict[str, str] = {
    "pass": "✅", "fail": "❌", "measured": "📏", "xfail": "🚫", "xpass": "❗", "error": "💥",
    "unstable": "❓", "empty": "⭕", "skipped": "⏩", "regression": "📉", "noisy": "🟡",
}
"""One wide emoji per verdict (no variation selectors, so terminal tables stay aligned)."""
UNKNOWN_MARK = "❔"

VERDICTS: tuple[str, ...] = tuple(MEANINGS)
CHECK_VERDICTS: tuple[str, ...] = tuple(v for v in VERDICTS if v not in ("regression", "noisy"))
"""What a check's own judgement can say, before any baseline comparison."""

JUDGED = ("pass", "fail", "xfail", "xpass")
"""Verdicts of a value judged against a threshold."""
VALUED = (*JUDGED, "measured")
"""Verdicts that carry a finite measured value (and so can be compared with a baseline)."""
UNMEASURED = ("error", "empty", "unstable")
"""Verdicts of a check that could not be judged: never an expected failure."""
FAILED = ("fail", "xfail", "regression")
"""Verdicts that fail a check's pytest item as a failed check (`xfail` then xfails)."""
FINE = ("pass", "measured", "xfail", "skipped", "noisy")
"""Verdicts that need no attention in a report (noisy is a notice only)."""

BASELINE_VERDICTS = ("same", "improved", "regression", "noisy", "new", "missing",
                     "incomparable")
"""A check against its baseline row (`saebench.gate`)."""
FAILING = ("regression", "error", "empty", "unstable", "missing", "incomparable")
"""Outcomes that fail `saebench gate` (and `noisy` with --strict): a check that got worse,
could not be measured, is in the baseline but not in the run (unless the run's selection
explains it), or whose baseline row or terms cannot be compared with it."""


def mark(verdict: str) -> str:
    """The verdict's mark and name, `✅ pass` (an unknown verdict gets `❔`)."""
    return f"{MARKS.get(verdict, UNKNOWN_MARK)} {verdict or '?'}"
