"""A map of the EU AI Act's Annex IV (technical documentation, Article 11) onto this report.

For each point of Annex IV (Regulation (EU) 2024/1689): what it asks (paraphrased), whether this run's
records cover it ("covered", "partly" or "not covered"), where in the report, and what the provider must
add. A run documents training, data, testing and privacy; it cannot document a provider, a deployment,
a risk-management system or a conformity declaration, and the map says so instead of implying coverage.
The report's test logs are dated and hashed (the manifest's SHA-256), not signed: the signature of the
responsible person is the provider's.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

__all__ = ["annex_iv_map"]

SOURCE = "Regulation (EU) 2024/1689 (AI Act), Annex IV: technical documentation referred to in Article 11(1)"


class _Facts(NamedTuple):
    """What the run-dependent rows read from the report's content."""

    owner: str  # the provider's name from the [card] settings, "" when unset
    grouped: list[str]  # titles of the models with per-group (or per-class) test metrics
    audit_ran: bool  # whether the membership-inference audit ran


class _Item(NamedTuple):
    """One point of Annex IV; ``where`` and ``provide`` are fixed or a function of the run's :class:`_Facts`."""

    item: str
    asks: str
    status: str  # "covered", "partly" or "not covered"
    where: tuple[str, ...] | Callable[[_Facts], list[str]]
    provide: str | Callable[[_Facts], str]  # "" when the run covers the point


def _provider_and_purpose(facts: _Facts) -> str:
    """1(a): the provider's name is asked for only when the card has no owner."""
    return ("" if facts.owner else "the provider's name ([card] owner); ") + (
        "the intended purpose of the deployed system, beyond the cards' demonstration use"
    )


def _testing_where(facts: _Facts) -> list[str]:
    """2(g): the audit is listed only when it ran."""
    return (
        ["#models (test metrics with bootstrap intervals, per-group error)"]
        + (["#audit (membership-inference attacks)"] if facts.audit_ran else [])
        + ["this report: dated (run created, report built) and hashed (manifest SHA-256 in its header)"]
    )


def _groups_where(facts: _Facts) -> list[str]:
    """3: the models whose accuracy is shown per group, if any."""
    grouped = facts.grouped
    return [f"#models (per-group accuracy: {', '.join(grouped)})" if grouped else "#models"] + [
        "model cards: Risks and mitigations, Input and output formats"
    ]


def _groups_provide(facts: _Facts) -> str:
    """3: per-group accuracy is the provider's to add when the run has no group column."""
    return "the human oversight and monitoring in operation" + (
        "" if facts.grouped else "; accuracy per group (no table column named sex or age and no image group array)"
    )


_ITEMS: tuple[_Item, ...] = (
    _Item(
        "1(a)",
        "intended purpose, the provider's name, the system's version",
        "partly",
        ("model cards: Intended use", "#reproducibility (git commit, run id)"),
        _provider_and_purpose,
    ),
    _Item(
        "1(b)",
        "interaction with hardware or software (other AI systems) outside the system",
        "not covered",
        ("model cards: Input and output formats",),
        "the systems the deployed models exchange data with",
    ),
    _Item(
        "1(c)",
        "versions of relevant software and requirements for updates",
        "partly",
        ("#reproducibility (library versions, Python, platform, git commit)",),
        "the requirements for version updates",
    ),
    _Item(
        "1(d)",
        "forms in which the system is placed on the market or put into service",
        "partly",
        ("#reproducibility (released files: safetensors weights, ONNX graphs, with SHA-256)",),
        "how it is distributed (package, API, embedded)",
    ),
    _Item(
        "1(e)",
        "hardware the system is intended to run on",
        "partly",
        ("#reproducibility (device per stage, the work each did)",),
        "the deployment hardware",
    ),
    _Item(
        "1(f)",
        "for a product component: photographs or illustrations of the product",
        "not covered",
        (),
        "only if the system is a component of a product",
    ),
    _Item("1(g)", "the user interface provided to the deployer", "not covered", (), "a description of it"),
    _Item(
        "1(h)",
        "instructions for use for the deployer",
        "partly",
        ("model cards (intended use, formats, caveats)",),
        "instructions for use",
    ),
    _Item(
        "2(a)",
        "methods and steps of development, pre-trained systems or third-party tools used",
        "covered",
        ("#models (architecture, training settings and history, public pretraining)", "#data", "#reproducibility"),
        "",
    ),
    _Item(
        "2(b)",
        "design specifications: logic, key choices and their rationale, trade-offs, expected output quality",
        "partly",
        ("#models", "model cards: Trade-offs"),
        "the rationale for the design choices, including the persons or groups the system is meant for",
    ),
    _Item(
        "2(c)",
        "system architecture and the computational resources used to develop, train, test and validate",
        "covered",
        ("#models (architecture, parameters)", "#reproducibility (device per stage, MACs, stage seconds)"),
        "",
    ),
    _Item(
        "2(d)",
        "data requirements: datasheets, provenance, scope, how data was obtained, labelled and cleaned",
        "partly",
        ("#data (source, SHA-256, splits, preprocessing, NaN policy)", "model cards: Data links"),
        "how the data was obtained, selected and labelled",
    ),
    _Item(
        "2(e)",
        "human oversight measures (Art. 14) and aids to interpret the outputs (Art. 13(3)(d))",
        "partly",
        ("#explanations (SHAP and LIME with their checks)",),
        "the human oversight measures in operation",
    ),
    _Item(
        "2(f)",
        "pre-determined changes to the system and its performance",
        "not covered",
        (),
        "any pre-determined changes and how compliance is kept through them",
    ),
    _Item(
        "2(g)",
        "validation and testing procedures and data, metrics (accuracy, robustness, discriminatory impact), "
        "test logs and reports dated and signed by the responsible persons",
        "partly",
        _testing_where,
        "the signature of the responsible person (e.g. over report_provenance.json's SHA-256); robustness tests",
    ),
    _Item(
        "2(h)",
        "cybersecurity measures",
        "partly",
        ("#reproducibility (SHA-256 of every artifact; python -m pipeline verify detects a changed file)",),
        "the deployment's cybersecurity measures",
    ),
    _Item(
        "3",
        "capabilities and limitations, accuracy for specific persons or groups, foreseeable unintended outcomes "
        "and risks, human oversight, input specifications",
        "partly",
        _groups_where,
        _groups_provide,
    ),
    _Item(
        "4",
        "appropriateness of the performance metrics",
        "partly",
        ("model cards: Metrics",),
        "why these metrics fit the intended purpose",
    ),
    _Item(
        "5",
        "the risk management system (Art. 9)",
        "not covered",
        ("model cards: Risks and mitigations (an input to it)",),
        "the risk management system",
    ),
    _Item(
        "6",
        "relevant changes made through the lifecycle",
        "not covered",
        ("#reproducibility (git commit of this run)",),
        "a change log across versions",
    ),
    _Item("7", "harmonised standards applied, or the solutions adopted", "not covered", (), "the list"),
    _Item("8", "a copy of the EU declaration of conformity (Art. 47)", "not covered", (), "the declaration"),
    _Item("9", "the post-market monitoring system and plan (Art. 72)", "not covered", (), "the monitoring plan"),
)


def _facts(content: Mapping[str, Any]) -> _Facts:
    """The card's owner, the models with per-group test metrics and whether the audit ran."""
    card = content.get("card") or {}
    models = content.get("models") or {}
    grouped = [
        m.get("title", n)
        for n, m in models.items()
        if ((m.get("metrics") or {}).get("test") or {}).get("subgroups")
        or ((m.get("metrics") or {}).get("test") or {}).get("per_class_recall")
    ]
    return _Facts(
        owner=str(card.get("owner") or "").strip(),
        grouped=grouped,
        audit_ran=bool((content.get("audit") or {}).get("ran")),
    )


def _row(entry: _Item, facts: _Facts) -> dict[str, Any]:
    """One item of the map, its run-dependent fields filled in from ``facts``."""
    where = entry.where(facts) if callable(entry.where) else entry.where
    provide = entry.provide(facts) if callable(entry.provide) else entry.provide
    return {"item": entry.item, "asks": entry.asks, "status": entry.status, "where": list(where), "provide": provide}


def annex_iv_map(content: Mapping[str, Any]) -> dict[str, Any]:
    """The Annex IV map of a report's content (every section already built but the summary).

    Returns ``{"source", "note", "items": [{"item", "asks", "status", "where", "provide"}]}``; ``where`` lists
    the report's section ids (``#models``) and files; ``provide`` is "" when the run covers the point.
    """
    facts = _facts(content)
    return {
        "source": SOURCE,
        "note": "what this run's records cover; a map for the provider's technical documentation, not a conformity "
        "assessment",
        "items": [_row(entry, facts) for entry in _ITEMS],
    }
