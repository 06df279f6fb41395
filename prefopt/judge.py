"""The statistics of the judge of trained generations (``recipes/judge_generations.py``): pure
functions on scores, lengths and texts, each worked by hand in ``tests/test_judge.py``.

The question they answer: did training make the model's *generations* better, or only longer
(or broken)? For each prompt (and sample) the trained policy's response is paired with its
starting point's response to the same prompt, drawn with the same seed:

- :func:`win_rate`: the share of pairs where the trained response scores higher, ties half;
- :func:`length_stats`: mean, median and p90 of the response lengths in tokens;
- :func:`length_buckets`: the win rate within buckets of the length difference (trained minus
  start): a gain that holds where the trained answer is *not* longer is not a length gain;
- :func:`degenerate_reasons` / :func:`degenerate_shares`: empty outputs, outputs that never
  stopped (ran to ``max_new_tokens``), and repeated word n-grams (loops such as "Hi Hi Hi");
- :func:`compare`: all of it for one decoding mode, as the JSON the recipe writes;
  :func:`format_table`: the console table.
"""

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = [
    "win_rate",
    "percentile",
    "length_stats",
    "length_buckets",
    "degenerate_reasons",
    "degenerate_shares",
    "compare",
    "format_table",
    "DEGENERATE_REASONS",
]

DEGENERATE_REASONS = ("empty", "never_stopped", "repeated_ngram")
_WORD = re.compile(r"\S+")


def _check_same_length(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} against {len(b)} items; the two sides must be paired")


def win_rate(trained: Sequence[float], start: Sequence[float]) -> Optional[float]:
    """The share of pairs ``(trained[i], start[i])`` where trained scores higher, a tie counted
    half (AlpacaEval's convention). None for no pairs.

    Raises:
        ValueError: sequences of different lengths.
    """
    _check_same_length(trained, start, "win_rate")
    if not trained:
        return None
    wins = sum(1.0 if t > s else 0.5 if t == s else 0.0 for t, s in zip(trained, start))
    return wins / len(trained)


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The ``q``-th percentile (0..100) with linear interpolation between the closest ranks
    (``numpy.percentile``'s default): rank ``(n - 1) * q / 100`` of the sorted values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def length_stats(lengths: Sequence[int]) -> Dict[str, Optional[float]]:
    """``{"mean", "median", "p90"}`` of response lengths (tokens); None for each when empty."""
    if not lengths:
        return {"mean": None, "median": None, "p90": None}
    return {"mean": sum(lengths) / len(lengths), "median": percentile(lengths, 50), "p90": percentile(lengths, 90)}


def length_buckets(
    trained_scores: Sequence[float],
    start_scores: Sequence[float],
    trained_lengths: Sequence[int],
    start_lengths: Sequence[int],
    tolerance: int = 2,
) -> List[Dict[str, Any]]:
    """The win rate of trained over start within three buckets of the length difference
    ``d = trained_length - start_length`` (tokens): ``shorter`` (``d < -tolerance``),
    ``similar`` (``|d| <= tolerance``) and ``longer`` (``d > tolerance``).

    Returns:
        one ``{"bucket", "pairs", "share", "win_rate"}`` per bucket, in that order
        (``win_rate`` None for an empty bucket; ``share`` of all pairs).

    Raises:
        ValueError: sequences of different lengths, or a negative tolerance.
    """
    for other, what in ((start_scores, "start_scores"), (trained_lengths, "trained_lengths"), (start_lengths, "start_lengths")):
        _check_same_length(trained_scores, other, f"length_buckets ({what})")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    groups: Dict[str, List[int]] = {"shorter": [], "similar": [], "longer": []}
    for i, (lt, ls) in enumerate(zip(trained_lengths, start_lengths)):
        d = lt - ls
        groups["shorter" if d < -tolerance else "longer" if d > tolerance else "similar"].append(i)
    n = len(trained_scores)
    out = []
    for name, idx in groups.items():
        out.append({
            "bucket": name,
            "pairs": len(idx),
            "share": len(idx) / n if n else None,
            "win_rate": win_rate([trained_scores[i] for i in idx], [start_scores[i] for i in idx]),
        })
    return out


def degenerate_reasons(text: str, stopped: bool, *, ngram: int = 3, max_ngram_repeats: int = 1) -> List[str]:
    """Why one response is degenerate (an empty list: it is not), in :data:`DEGENERATE_REASONS`
    order:

    - ``empty``: no non-whitespace character;
    - ``never_stopped``: no stop token within ``max_new_tokens`` (``stopped`` False);
    - ``repeated_ngram``: some run of ``ngram`` whitespace-separated words (case-insensitive)
      occurs more than ``max_ngram_repeats`` times, e.g. "Hi Hi Hi Hi" (``(hi, hi, hi)`` twice)
      or a sentence said twice.
    """
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    reasons = []
    if not text.strip():
        reasons.append("empty")
    if not stopped:
        reasons.append("never_stopped")
    words = [w.lower() for w in _WORD.findall(text)]
    counts: Dict[tuple, int] = {}
    for i in range(len(words) - ngram + 1):
        g = tuple(words[i:i + ngram])
        counts[g] = counts.get(g, 0) + 1
    if counts and max(counts.values()) > max_ngram_repeats:
        reasons.append("repeated_ngram")
    return reasons


def degenerate_shares(reasons: Sequence[Sequence[str]]) -> Dict[str, Optional[float]]:
    """``{"any", "empty", "never_stopped", "repeated_ngram"}``: the share of responses with any
    reason, and with each (from :func:`degenerate_reasons` of every response)."""
    n = len(reasons)
    if n == 0:
        return {"any": None, **{r: None for r in DEGENERATE_REASONS}}
    out = {"any": sum(bool(r) for r in reasons) / n}
    for name in DEGENERATE_REASONS:
        out[name] = sum(name in r for r in reasons) / n
    return out


def _side(scores: Sequence[float], lengths: Sequence[int], texts: Sequence[str], stopped: Sequence[bool],
          ngram: int, max_ngram_repeats: int) -> Dict[str, Any]:
    reasons = [degenerate_reasons(t, s, ngram=ngram, max_ngram_repeats=max_ngram_repeats) for t, s in zip(texts, stopped)]
    return {
        "mean_reward": sum(scores) / len(scores) if scores else None,
        "length": length_stats(lengths),
        "degenerate": degenerate_shares(reasons),
    }


def compare(
    trained: Mapping[str, Sequence],
    start: Mapping[str, Sequence],
    *,
    length_tolerance: int = 2,
    ngram: int = 3,
    max_ngram_repeats: int = 1,
) -> Dict[str, Any]:
    """The judge's figures for one decoding mode.

    Args:
        trained, start: each ``{"scores": [float], "lengths": [int], "texts": [str],
            "stopped": [bool]}``, item ``i`` of both the same prompt and seed.
        length_tolerance: see :func:`length_buckets`.
        ngram, max_ngram_repeats: see :func:`degenerate_reasons`.

    Returns:
        ``{"pairs", "trained": {...}, "start": {...}, "win_rate", "length_buckets": [...]}``,
        each side ``{"mean_reward", "length": {"mean", "median", "p90"}, "degenerate": {...}}``.
    """
    for key in ("scores", "lengths", "texts", "stopped"):
        _check_same_length(trained[key], start[key], f"compare ({key})")
        _check_same_length(trained[key], trained["scores"], f"compare (trained {key})")
    return {
        "pairs": len(trained["scores"]),
        "trained": _side(trained["scores"], trained["lengths"], trained["texts"], trained["stopped"], ngram, max_ngram_repeats),
        "start": _side(start["scores"], start["lengths"], start["texts"], start["stopped"], ngram, max_ngram_repeats),
        "win_rate": win_rate(trained["scores"], start["scores"]),
        "length_buckets": length_buckets(trained["scores"], start["scores"], trained["lengths"], start["lengths"], length_tolerance),
    }


def _f(x: Any, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_table(report: Mapping[str, Mapping[str, Any]]) -> str:
    """The console table of ``{mode: compare(...)}``: one block per decoding mode, a row per
    figure, columns start / trained."""
    lines = []
    for mode, r in report.items():
        s, t = r["start"], r["trained"]
        lines.append(f"{mode} ({r['pairs']} pairs)        start    trained")
        rows = [
            ("mean reward", s["mean_reward"], t["mean_reward"], "{:.3f}"),
            ("length mean", s["length"]["mean"], t["length"]["mean"], "{:.1f}"),
            ("length median", s["length"]["median"], t["length"]["median"], "{:.1f}"),
            ("length p90", s["length"]["p90"], t["length"]["p90"], "{:.1f}"),
        ]
        rows += [(f"degenerate: {k}", s["degenerate"][k], t["degenerate"][k], "{:.3f}") for k in ("any", *DEGENERATE_REASONS)]
        for name, a, b, fmt in rows:
            lines.append(f"  {name:<26}{_f(a, fmt):>8}{_f(b, fmt):>11}")
        lines.append(f"  {'win rate (trained > start)':<26}{_f(r['win_rate']):>19}")
        for b in r["length_buckets"]:
            label = f"  win rate, {b['bucket']} ({b['pairs']})"
            lines.append(f"{label:<28}{_f(b['win_rate']):>19}")
    return "\n".join(lines)
