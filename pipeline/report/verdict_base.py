"""What every verdict of the report's first screen shares: statuses, areas, and the shape of one verdict.

See :mod:`pipeline.report.verdicts` for how each area's verdict is derived.
"""

from __future__ import annotations

from typing import Any

from auditml_core.models import MODELS

FAILED, CAVEAT, HOLDS, NOT_APPLICABLE = "failed", "holds with caveat", "holds", "not applicable"
STATUSES = (FAILED, CAVEAT, HOLDS, NOT_APPLICABLE)  # worst first: the order of the first screen
AREAS = (  # (area, title, evidence anchor)
    ("privacy-guarantee", "Privacy guarantee", "privacy"),
    ("privacy-audit", "Privacy audit", "audit"),
    ("utility", "Utility vs baseline", "models"),
    ("subgroups", "Subgroup gaps", "models"),
    ("explanations", "Explanation quality", "explanations"),
    ("students", "Distilled students", "distill"),
    ("provenance", "Provenance and integrity", "reproducibility"),
)
MAX_WORDS = 25  # per sentence, before a user's own column names (tests check it on every kind of run)
TOLERANCE = 1e-9  # the privacy section's own tolerance for "ε exceeds the target"


def numbers_entry(label: str, value: Any, interval: Any = None, unit: str = "") -> dict[str, Any]:
    return {
        "label": label,
        "value": value,
        "interval": list(interval) if isinstance(interval, (list, tuple)) and len(interval) == 2 else None,
        "unit": unit,
    }


def verdict(area: str, status: str, sentence: str, numbers: list[dict[str, Any]], anchor: str = "") -> dict:
    title, default_anchor = next((t, a) for a_, t, a in AREAS if a_ == area)
    return {
        "area": area,
        "title": title,
        "status": status,
        "numbers": numbers,
        "sentence": sentence,
        "evidence": "#" + (anchor or default_anchor),
        "anchor": f"verdict-{area}",
    }


def lead(numbers: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    """``numbers`` with those whose label contains the first key first, then the second key's, ...: the first
    screen shows a verdict's first numbers, so the decisive one goes first."""
    rank = [next((i for i, k in enumerate(keys) if k in n["label"]), len(keys)) for n in numbers]
    return [n for _, n in sorted(zip(rank, numbers), key=lambda rn: rn[0])]


def dead_classes(confusion: Any) -> dict[str, int] | None:
    """From a test confusion matrix (rows: true class, columns: predicted): how many classes with test examples the
    classifier never gets right (recall 0), of how many, and the largest number of predictions one class takes.
    None without a matrix (a regressor)."""
    if not confusion:
        return None
    cm = [[int(v) for v in row] for row in confusion]
    present = [i for i, row in enumerate(cm) if sum(row) > 0]
    predicted = [sum(row[j] for row in cm) for j in range(len(cm[0]))]
    return {
        "recall_zero": sum(1 for i in present if cm[i][i] == 0),
        "classes": len(present),
        "top_predicted": max(predicted, default=0),
        "n": sum(predicted),
    }


def model_title(name: str) -> str:
    return MODELS[name].title if name in MODELS else name
