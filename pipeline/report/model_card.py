"""A model card (Markdown) per model, from the report's content tree, through a Jinja2 template.

Sections follow Mitchell et al., "Model Cards for Model Reporting" (2019): model details, intended use,
factors, metrics, evaluation data, training data, quantitative analyses, ethical considerations, caveats
and recommendations, plus the Model Card Toolkit / Hugging Face fields of :mod:`pipeline.report.card_fields`.
The text is ``templates/model_card.md.j2``; autoescape passes every value through :func:`md`, which
HTML-escapes it (Markdown renderers pass raw HTML through) and neutralises table pipes and line breaks.
"""

from __future__ import annotations

from typing import Any, Mapping

from markupsafe import Markup

from auditml_core.codebook import describe
from auditml_core.models import MODELS, model_entry
from pipeline.report import card_fields
from pipeline.report.audit import tpr_rows
from pipeline.report.fmt import number
from pipeline.report.sentences import (
    WHY_NOT_RIDGE,
    baseline_sentence,
    randomisation_sentence,
    reference_sentence,
    replication_cell,
)
from pipeline.report.templating import markdown_environment


def dp_levels(m: Mapping[str, Any]) -> str:
    """'yes (...)' naming the DP levels this model's training records hold, else 'no'."""
    levels = [
        level
        for level, rec in (
            ("sample-level DP-SGD", m.get("privacy")),
            ("user-level DP-FedAvg", (m.get("training") or {}).get("user_level_privacy")),
        )
        if rec
    ]
    return f"yes ({', '.join(levels)})" if levels else "no"


def model_caveats(content: Mapping[str, Any], m: Mapping[str, Any]) -> list[str]:
    """The report's caveats that name this model, or no model at all."""
    titles = [e.title for e in MODELS.values()]
    return [c for c in content.get("caveats", []) if m["title"] in c or not any(t in c for t in titles)]


def audit_items(am: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(kind, who, record) of each attack on the released model and its positive control, then each canary audit."""
    control_who = (
        "noise-mutant positive control" if am["control"].get("kind") == "noise mutant" else "overfit positive control"
    )
    items = [
        ("attack", who, a)
        for who, attacks in (("released model", am["attacks"]), (control_who, am["control"]["attacks"]))
        for a in attacks
    ]
    for who, c in (
        ("released model's training", am.get("canaries")),
        ("positive control", am["control"].get("canaries")),
    ):
        if c and c.get("ran"):
            items.append(("canary", who, c))
    return items


def class_errors_by_name(test: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The per-class error records of a classifier's test split, by class name."""
    return {r["class"]: r for r in test.get("per_class_errors") or []}


def without(mapping: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A copy of ``mapping`` without ``key``."""
    return {k: v for k, v in mapping.items() if k != key}


def _environment():
    env = markdown_environment()
    if "yaml" not in env.filters:
        env.filters["yaml"] = lambda value: Markup(card_fields.yaml_scalar(value))  # already safe for the card
        env.filters["number"] = number
        env.globals.update(
            {
                "audit_items": audit_items,
                "tpr_rows": tpr_rows,
                "baseline_sentence": baseline_sentence,
                "card_tags": card_fields.tags,
                "card_value": card_fields.stated,
                "class_errors_by_name": class_errors_by_name,
                "describe": describe,
                "dp_levels": dp_levels,
                "known_data": card_fields.known,
                "known_is_medical": card_fields.is_medical,
                "method_references": card_fields.METHOD_REFERENCES,
                "model_caveats": model_caveats,
                "not_stated": card_fields.NOT_STATED,
                "personal_hints": card_fields.personal_hints,
                "randomisation_sentence": randomisation_sentence,
                "ranked_importance": lambda imp: sorted(imp.items(), key=lambda kv: -(kv[1] or 0)),
                "reference_sentence": reference_sentence,
                "replication_cell": replication_cell,
                "why_not_ridge": WHY_NOT_RIDGE,
                "without": without,
            }
        )
    return env


def training_line(training: Mapping[str, Any]) -> str:
    """The card's "- Training: ..." line of one model's training record (federated: rounds x local epochs, clients,
    strategy, partitioner, the clients' optimiser; central: the fit settings)."""
    return str(_environment().get_template("model_card_macros.md.j2").module.training_line(training))


def render(content: Mapping[str, Any], name: str) -> str:
    """The model card of model ``name`` ("regressor" or "cnn") as Markdown."""
    template = _environment().get_template("model_card.md.j2")
    return template.render(c=content, name=name, entry=model_entry(name))
