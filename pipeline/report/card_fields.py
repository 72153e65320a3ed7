"""The model-card fields of the Model Card Toolkit and Hugging Face cards that a run's own records lack.

Owners, contact, licences, intended users and a user's data sensitivity come from the ``[card]`` config
section (``content["card"]``); an empty value is printed as "not stated", never guessed. The rest is read
from the report's content: the data's source and links (scikit-learn's embedded tables are known data sets),
trade-offs and risks with the run's own numbers, and the input/output formats of the released files. The
text is ``templates/model_card_fields.md.j2``; this module holds what it is written from.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from auditml_core.models import model_entry

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


def stated(card: Mapping[str, Any], key: str) -> str:
    """An owner-given [card] value, or "not stated"."""
    return str(card.get(key) or "").strip() or NOT_STATED


def known(d: Mapping[str, Any]) -> Mapping[str, str] | None:
    """What is known about a dataset's source when it is one of scikit-learn's embedded tables, else None."""
    source = str((d.get("provenance") or {}).get("source", ""))
    return next((v for k, v in KNOWN_DATA.items() if k in source), None)


def is_medical(d: Mapping[str, Any]) -> bool:
    """Whether the dataset is scikit-learn's diabetes table (medical records)."""
    return known(d) is KNOWN_DATA["load_diabetes"]


def personal_hints(d: Mapping[str, Any]) -> list[str]:
    """A user's columns whose names suggest personal attributes (a hint, not a classification)."""
    return [f for f in d.get("feature_names", []) if any(h in str(f).lower() for h in PERSONAL_HINTS)]


def yaml_scalar(value: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax), with <, > and & escaped so no tag reaches a Markdown viewer."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def tags(content: Mapping[str, Any], name: str) -> list[str]:
    """The Hugging Face header's tags: the task, the methods, and differential-privacy when DP is on."""
    regression = model_entry(name).task == "regression"
    out = ["tabular-regression" if regression else "image-classification", "shap", "lime", "model-card"]
    if (content["models"][name].get("privacy") or {}) or content["privacy"].get("enabled"):
        out.append("differential-privacy")
    return out
