"""Explain torch models with SHAP and LIME, and measure how far to trust the result.

A library: in-memory arrays in, :class:`Explanation` and small result objects
out; no file I/O. Typical use::

    from explain import get_explainer, make_predict_fn, deletion_insertion

    expl = get_explainer("shap-deep")(model, x, background=bg, task="classification", seed=7)
    faith = deletion_insertion(expl, make_predict_fn(model, task="classification"),
                               baseline=bg.mean(axis=0), n_steps=16, seed=7)

Every explainer explains the same number: the regression output, or the logit
of the explained class (the predicted class unless ``targets`` is given).
"""

from explain._model import make_predict_fn
from explain.lime_image import grid_segments
from explain.quality import (
    AdditivityResult,
    AgreementResult,
    DeletionInsertionResult,
    DistanceResult,
    StabilityResult,
    additivity_error,
    agreement,
    deletion_insertion,
    explanation_distance,
    stability,
)
from explain.reference import ReferenceErrorResult, reference_error
from explain.registry import ExplainerFn, available_explainers, explain_all, get_explainer, tabular_shap_method
from explain.sanity import RandomisationResult, class_randomisation, model_randomisation, randomised_copy
from explain.types import Explanation, json_safe
from explain.variants import compare_variants

__all__ = [
    "Explanation",
    "json_safe",
    "ExplainerFn",
    "available_explainers",
    "get_explainer",
    "explain_all",
    "tabular_shap_method",
    "make_predict_fn",
    "grid_segments",
    "AdditivityResult",
    "AgreementResult",
    "DeletionInsertionResult",
    "DistanceResult",
    "StabilityResult",
    "additivity_error",
    "agreement",
    "deletion_insertion",
    "explanation_distance",
    "stability",
    "compare_variants",
    "ReferenceErrorResult",
    "reference_error",
    "RandomisationResult",
    "model_randomisation",
    "class_randomisation",
    "randomised_copy",
]
