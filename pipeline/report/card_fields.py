"""The model-card fields of the Model Card Toolkit and Hugging Face cards that a run's own records lack.

Owners, contact, licences, intended users and a user's data sensitivity come from the ``[card]`` config
section (``content["card"]``); an empty value is printed as "not stated", never guessed. The rest is read
from the report's content: the data's source and links (scikit-learn's embedded tables are known data sets),
trade-offs and risks with the run's own numbers, and the input/output formats of the released files.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from auditml_core.models import model_entry
from pipeline.report.fmt import md, number
from pipeline.report.sentences import baseline_sentence

NOT_STATED = "not stated"

# What is known about scikit-learn's embedded tables (their documentation, and the sources it cites).
KNOWN_DATA = {
    "load_diabetes": {
        "name": "scikit-learn diabetes (Efron et al. 2004)",
        "link": "https://www4.stat.ncsu.edu/~boos/var.select/diabetes.html",
        "reference": "B. Efron, T. Hastie, I. Johnstone, R. Tibshirani (2004), Least Angle Regression, Annals of "
        "Statistics 32(2)",
        "sensitive": "medical records of 442 diabetes patients: age, sex, body mass index, average blood pressure and "
        "six blood serum measurements, and a disease-progression score one year after baseline. Health data with "
        "age and sex is sensitive personal data (special-category data under the GDPR, Art. 9) even when, as here, "
        "the features are mean-centred and scaled; the run keeps it in its data/ folder.",
    },
    "load_digits": {
        "name": "scikit-learn digits (UCI Optical Recognition of Handwritten Digits)",
        "link": "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
        "reference": "E. Alpaydin, C. Kaynak (1998), Optical Recognition of Handwritten Digits, UCI Machine Learning "
        "Repository",
        "sensitive": "8x8 images of handwritten digits; no writer identity or other personal attribute is recorded.",
    },
}
METHOD_REFERENCES = (
    "S. Lundberg, S.-I. Lee (2017), A Unified Approach to Interpreting Model Predictions (SHAP), NeurIPS",
    'M. T. Ribeiro, S. Singh, C. Guestrin (2016), "Why Should I Trust You?" (LIME), KDD',
    "M. Abadi et al. (2016), Deep Learning with Differential Privacy (DP-SGD), CCS",
    "J. Adebayo et al. (2018), Sanity Checks for Saliency Maps, NeurIPS",
    "L. Sixt, M. Granz, T. Landgraf (2020), When Explanations Lie: Why Many Modified BP Attributions Fail, ICML",
    "M. Mitchell et al. (2019), Model Cards for Model Reporting, FAT*",
)
# Column names that usually hold personal attributes (a hint for a user's own table, not a classification).
PERSONAL_HINTS = ("age", "sex", "gender", "race", "ethnic", "religion", "income", "zip", "postcode", "birth", "name")


def _stated(card: Mapping[str, Any], key: str) -> str:
    return str(card.get(key) or "").strip() or NOT_STATED


def _known(d: Mapping[str, Any]) -> Mapping[str, str] | None:
    source = str((d.get("provenance") or {}).get("source", ""))
    return next((v for k, v in KNOWN_DATA.items() if k in source), None)


def _yaml(value: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax), with <, > and & escaped so no tag reaches a Markdown viewer."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def front_matter(content: Mapping[str, Any], name: str) -> list[str]:
    """The Hugging Face YAML metadata header (license, library_name, tags, datasets, metrics).

    Values are JSON strings, which YAML reads as double-quoted scalars whatever characters they hold.
    """
    card = content.get("card") or {}
    entry = model_entry(name)
    d = content["data"][entry.dataset]
    known = _known(d)
    regression = entry.task == "regression"
    tags = ["tabular-regression" if regression else "image-classification", "shap", "lime", "model-card"]
    if (content["models"][name].get("privacy") or {}) or content["privacy"].get("enabled"):
        tags.append("differential-privacy")
    dataset = known["name"] if known else str((d.get("provenance") or {}).get("source", NOT_STATED))
    metrics = ["r2", "rmse", "mae"] if regression else ["accuracy", "f1"]

    def listed(key: str, values: list[str]) -> list[str]:
        return [f"{key}:"] + [f"- {_yaml(v)}" for v in values]

    return [
        "---",
        f"license: {_yaml(_stated(card, 'license'))}",
        'library_name: "pytorch"',
        *listed("tags", tags),
        *listed("datasets", [dataset]),
        *listed("metrics", metrics),
        "---",
        "",
    ]


def _formats(content: Mapping[str, Any], name: str) -> list[str]:
    entry = model_entry(name)
    d = content["data"][entry.dataset]
    onnx = ((content.get("distill") or {}).get(name, {}).get("record") or {}).get("onnx") or {}
    graph = (
        f" The ONNX graph `{md(onnx.get('teacher_file', f'models/{name}.onnx'))}` takes `{md(onnx.get('input'))}` "
        f"({md(onnx.get('inputs', ''))}) and returns `{md(onnx.get('output'))}`."
        if onnx
        else ""
    )
    if entry.task == "regression":
        cols = ", ".join(f"`{md(f)}`" for f in d.get("feature_names", []))
        return [
            f"- Input: one row per record with the {len(d.get('feature_names', []))} numeric feature columns {cols}, "
            "in the dataset's own units.",
            f"- Output: the predicted `{md(d.get('target_name', 'target'))}`, in target units.{graph}",
        ]
    shape = "x".join(map(str, d.get("input_shape", [])))
    classes = ", ".join(md(c) for c in d.get("class_names", []))
    return [
        f"- Input: images of shape {md(shape)} (channels x height x width), pixel values as the dataset gives them.",
        f"- Output: one probability per class ({classes}).{graph}",
    ]


def _trade_offs(content: Mapping[str, Any], name: str) -> list[str]:
    m = content["models"][name]
    out = []
    rec = m.get("privacy") or {}
    if rec:
        out.append(
            f"- Privacy against accuracy: DP-SGD at ε = {number(rec.get('epsilon'), 3)} (δ = {number(rec.get('delta'))}) "
            "bounds what the weights reveal about any training record, at a cost in accuracy; "
            + md((m.get("public_only_baseline") or {}).get("statement") or "")
        )
    else:
        out.append(
            "- Privacy against accuracy: trained without differential privacy, so nothing bounds what the weights, "
            "metrics and explanations reveal about training records; dp.enabled = true trades accuracy for that bound."
        )
    versus = (m.get("baseline") or {}).get("comparison")
    if versus:
        out.append(f"- Model complexity: {md(baseline_sentence(versus))}.")
    student = ((content.get("distill") or {}).get(name) or {}).get("record") or {}
    if student.get("student_parameters"):
        agree = (
            f"top-1 agreement with the teacher {number(student['top1_agreement'], 3)}"
            if "top1_agreement" in student
            else f"fidelity R² to the teacher {number(student.get('student_fidelity_r2'), 3)}"
        )
        out.append(
            f"- Size against fidelity: the distilled student has {number(student['student_parameters'])} parameters "
            f"(the teacher {number(student.get('teacher_parameters'))}); {agree}."
        )
    q = ((content["explanations"]["models"].get(name) or {}).get("quality")) or {}
    if q:
        out.append(f"- Explanation cost against exactness: {md(q.get('primary'))} values are {md(q.get('exactness'))}.")
    return out


def _risks(content: Mapping[str, Any], name: str) -> list[list[str]]:
    m = content["models"][name]
    d = content["data"][model_entry(name).dataset]
    audit = ((content.get("audit") or {}).get("models") or {}).get(name) or {}
    verdict = (audit.get("verdict") or {}).get("statement") or "no privacy audit was run"
    dp = "DP-SGD" if m.get("privacy") else "none (no DP)"
    test = (m.get("metrics") or {}).get("test") or {}
    groups = "subgroup error tables" if test.get("subgroups") else "no subgroup analysis (none was possible)"
    cohorts = "; error cohorts replicated on validation" if (test.get("cohorts") or {}).get("replication_note") else ""
    q = (content["explanations"]["models"].get(name) or {}).get("quality") or {}
    r = q.get("randomisation") or {}
    sanity = (
        f"randomisation checks: signed {'pass' if r.get('passed_signed') else 'FAIL'}, |attribution| "
        f"{'pass' if r.get('passed_abs') else 'FAIL'}"
        if r
        else "no sanity check"
    )
    medical = _known(d) is KNOWN_DATA["load_diabetes"]
    return [
        [
            "Training records leak (membership inference)",
            f"{dp}; {verdict}",
            "what DP does not cover (see the report's privacy section)",
        ],
        [
            "Use for decisions about individuals" + (" (medical)" if medical else ""),
            "stated out of scope; no domain validation was run",
            "a validation on the deployment population by the owner",
        ],
        [
            "Unequal error across groups",
            groups + cohorts,
            "groups are small: intervals overlap; check on new data",
        ],
        [
            "Explanations read as causes or over-trusted",
            f"{sanity}; SHAP-LIME disagreements flagged",
            "explanations describe the model, not the world",
        ],
        [
            "Data from another population (shift)",
            "test metrics with bootstrap intervals; partial-dependence grids on observed ranges",
            "metrics describe the test split only; re-check before use",
        ],
    ]


def sections(content: Mapping[str, Any], name: str, table) -> list[str]:
    """The card's owner/licence/citation, data, trade-off, risk and format sections (Markdown lines).

    ``table`` renders ``(header, rows)`` as a Markdown table (the card's own helper).
    """
    card = content.get("card") or {}
    d = content["data"][model_entry(name).dataset]
    known = _known(d)
    prov = d.get("provenance") or {}
    citation = str(card.get("citation") or "").strip()
    out = ["## Owners, licence and citation", ""]
    out += [
        f"- Owner: {md(_stated(card, 'owner'))}; contact: {md(_stated(card, 'contact'))}.",
        f"- Intended users (as the owner states them): {md(_stated(card, 'intended_users'))}.",
        f"- Licence of the models: {md(_stated(card, 'license'))}; of the training data: "
        f"{md(_stated(card, 'data_license'))}.",
        "- How to cite these models: " + ("" if citation else NOT_STATED + "."),
        "",
    ]
    if citation:
        out += ["```", citation.replace("```", "'''"), "```", ""]
    refs = ([known["reference"]] if known else []) + list(METHOD_REFERENCES)
    out += ["References:", ""] + [f"- {md(r)}" for r in refs] + [""]

    out += ["## Data links and sensitive data", ""]
    sha = prov.get("sha256") or prov.get("sha256_of_arrays")
    where = f"{md(known['name'])}, {known['link']}" if known else md(prov.get("source", NOT_STATED))
    out += [f"- Training data: {where} (SHA-256 `{md(sha or 'n/a')}`; splits and preprocessing in the report)."]
    if known:
        out += [f"- Sensitive data: {md(known['sensitive'])}"]
    else:
        hints = [f for f in d.get("feature_names", []) if any(h in str(f).lower() for h in PERSONAL_HINTS)]
        out += [
            f"- Sensitive data: {md(_stated(card, 'sensitive_data'))}"
            + (
                f" (columns whose names suggest personal attributes: {', '.join(f'`{md(h)}`' for h in hints)})"
                if hints
                else ""
            )
            + "."
        ]
    out += [""]
    out += ["## Trade-offs", ""] + _trade_offs(content, name) + [""]
    out += ["## Risks and mitigations", ""]
    out += [
        table(["risk", "mitigation in this run", "what remains"], [[md(c) for c in r] for r in _risks(content, name)])
    ]
    out += ["", "## Input and output formats", ""] + _formats(content, name) + [""]
    return out
