"""A map of the EU AI Act's Annex IV (technical documentation, Article 11) onto this report.

For each point of Annex IV (Regulation (EU) 2024/1689): what it asks (paraphrased), whether this run's
records cover it ("covered", "partly" or "not covered"), where in the report, and what the provider must
add. A run documents training, data, testing and privacy; it cannot document a provider, a deployment,
a risk-management system or a conformity declaration, and the map says so instead of implying coverage.
The report's test logs are dated and hashed (the manifest's SHA-256), not signed: the signature of the
responsible person is the provider's.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["annex_iv_map"]

SOURCE = "Regulation (EU) 2024/1689 (AI Act), Annex IV: technical documentation referred to in Article 11(1)"


def _row(item: str, asks: str, status: str, where: list[str], provide: str) -> dict[str, Any]:
    return {"item": item, "asks": asks, "status": status, "where": where, "provide": provide}


def annex_iv_map(content: Mapping[str, Any]) -> dict[str, Any]:
    """The Annex IV map of a report's content (every section already built but the summary).

    Returns ``{"source", "note", "items": [{"item", "asks", "status", "where", "provide"}]}``; ``where`` lists
    the report's section ids (``#models``) and files; ``provide`` is "" when the run covers the point.
    """
    card = content.get("card") or {}
    owner = str(card.get("owner") or "").strip()
    models = content.get("models") or {}
    grouped = [
        m.get("title", n)
        for n, m in models.items()
        if ((m.get("metrics") or {}).get("test") or {}).get("subgroups")
        or ((m.get("metrics") or {}).get("test") or {}).get("per_class_recall")
    ]
    audit_ran = bool((content.get("audit") or {}).get("ran"))
    items = [
        _row(
            "1(a)",
            "intended purpose, the provider's name, the system's version",
            "partly",
            ["model cards: Intended use", "#reproducibility (git commit, run id)"],
            ("" if owner else "the provider's name ([card] owner); ")
            + "the intended purpose of the deployed system, beyond the cards' demonstration use",
        ),
        _row(
            "1(b)",
            "interaction with hardware or software (other AI systems) outside the system",
            "not covered",
            ["model cards: Input and output formats"],
            "the systems the deployed models exchange data with",
        ),
        _row(
            "1(c)",
            "versions of relevant software and requirements for updates",
            "partly",
            ["#reproducibility (library versions, Python, platform, git commit)"],
            "the requirements for version updates",
        ),
        _row(
            "1(d)",
            "forms in which the system is placed on the market or put into service",
            "partly",
            ["#reproducibility (released files: safetensors weights, ONNX graphs, with SHA-256)"],
            "how it is distributed (package, API, embedded)",
        ),
        _row(
            "1(e)",
            "hardware the system is intended to run on",
            "partly",
            ["#reproducibility (device per stage, the work each did)"],
            "the deployment hardware",
        ),
        _row(
            "1(f)",
            "for a product component: photographs or illustrations of the product",
            "not covered",
            [],
            "only if the system is a component of a product",
        ),
        _row("1(g)", "the user interface provided to the deployer", "not covered", [], "a description of it"),
        _row(
            "1(h)",
            "instructions for use for the deployer",
            "partly",
            ["model cards (intended use, formats, caveats)"],
            "instructions for use",
        ),
        _row(
            "2(a)",
            "methods and steps of development, pre-trained systems or third-party tools used",
            "covered",
            ["#models (architecture, training settings and history, public pretraining)", "#data", "#reproducibility"],
            "",
        ),
        _row(
            "2(b)",
            "design specifications: logic, key choices and their rationale, trade-offs, expected output quality",
            "partly",
            ["#models", "model cards: Trade-offs"],
            "the rationale for the design choices, including the persons or groups the system is meant for",
        ),
        _row(
            "2(c)",
            "system architecture and the computational resources used to develop, train, test and validate",
            "covered",
            ["#models (architecture, parameters)", "#reproducibility (device per stage, MACs, stage seconds)"],
            "",
        ),
        _row(
            "2(d)",
            "data requirements: datasheets, provenance, scope, how data was obtained, labelled and cleaned",
            "partly",
            ["#data (source, SHA-256, splits, preprocessing, NaN policy)", "model cards: Data links"],
            "how the data was obtained, selected and labelled",
        ),
        _row(
            "2(e)",
            "human oversight measures (Art. 14) and aids to interpret the outputs (Art. 13(3)(d))",
            "partly",
            ["#explanations (SHAP and LIME with their checks)"],
            "the human oversight measures in operation",
        ),
        _row(
            "2(f)",
            "pre-determined changes to the system and its performance",
            "not covered",
            [],
            "any pre-determined changes and how compliance is kept through them",
        ),
        _row(
            "2(g)",
            "validation and testing procedures and data, metrics (accuracy, robustness, discriminatory impact), "
            "test logs and reports dated and signed by the responsible persons",
            "partly",
            ["#models (test metrics with bootstrap intervals, per-group error)"]
            + (["#audit (membership-inference attacks)"] if audit_ran else [])
            + ["this report: dated (run created, report built) and hashed (manifest SHA-256 in its header)"],
            "the signature of the responsible person (e.g. over report_provenance.json's SHA-256); robustness tests",
        ),
        _row(
            "2(h)",
            "cybersecurity measures",
            "partly",
            ["#reproducibility (SHA-256 of every artifact; python -m pipeline verify detects a changed file)"],
            "the deployment's cybersecurity measures",
        ),
        _row(
            "3",
            "capabilities and limitations, accuracy for specific persons or groups, foreseeable unintended outcomes "
            "and risks, human oversight, input specifications",
            "partly",
            [f"#models (per-group accuracy: {', '.join(grouped)})" if grouped else "#models"]
            + ["model cards: Risks and mitigations, Input and output formats"],
            "the human oversight and monitoring in operation"
            + ("" if grouped else "; accuracy per group (no table column named sex or age and no image group array)"),
        ),
        _row(
            "4",
            "appropriateness of the performance metrics",
            "partly",
            ["model cards: Metrics"],
            "why these metrics fit the intended purpose",
        ),
        _row(
            "5",
            "the risk management system (Art. 9)",
            "not covered",
            ["model cards: Risks and mitigations (an input to it)"],
            "the risk management system",
        ),
        _row(
            "6",
            "relevant changes made through the lifecycle",
            "not covered",
            ["#reproducibility (git commit of this run)"],
            "a change log across versions",
        ),
        _row("7", "harmonised standards applied, or the solutions adopted", "not covered", [], "the list"),
        _row("8", "a copy of the EU declaration of conformity (Art. 47)", "not covered", [], "the declaration"),
        _row(
            "9",
            "the post-market monitoring system and plan (Art. 72)",
            "not covered",
            [],
            "the monitoring plan",
        ),
    ]
    return {
        "source": SOURCE,
        "note": "what this run's records cover; a map for the provider's technical documentation, not a conformity "
        "assessment",
        "items": items,
    }
