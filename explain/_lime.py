"""What both LIME explainers keep of each row's surrogate fit (lime's weighted ridge model)."""

from __future__ import annotations

from typing import Any

import numpy as np


class SurrogateFits:
    """Per-row summaries of LIME's local surrogates, filled row by row.

    ``intercept`` is the surrogate's output with every feature at its reference (the explanation's base
    value), ``score`` its R^2 on its weighted samples (local fidelity) and ``local_pred`` its prediction at
    the explained row.
    """

    def __init__(self, n: int):
        self.intercept = np.zeros(n)
        self.score = np.zeros(n)
        self.local_pred = np.zeros(n)

    def record(self, i: int, exp: Any, *, label: int) -> None:
        """Keep row ``i``'s fit from lime's ``exp``; ``label`` is the key of the explained output's intercept."""
        self.intercept[i] = float(exp.intercept[label])
        self.score[i] = float(exp.score)
        self.local_pred[i] = float(np.asarray(exp.local_pred).reshape(-1)[0])

    def extras(self) -> dict[str, np.ndarray]:
        """``score`` then ``local_pred``, as the explanation's extras."""
        return {"score": self.score, "local_pred": self.local_pred}
