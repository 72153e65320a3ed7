"""The console: which loggers speak at which level (kept light: ``python -m pipeline`` sets it up first)."""

from __future__ import annotations

import logging

# The project's own loggers: INFO by default (a line per stage, what each found), WARNING with --quiet. Every other
# library (shap logs its arrays at INFO; matplotlib, PIL, httpx, numba, lime) stays at WARNING unless -v.
PROJECT_LOGGERS = ("pipeline", "auditml_core", "federated", "explain")


def configure_logging(*, quiet: bool, verbose: bool) -> None:
    """The project's loggers at INFO (WARNING if ``quiet``), the libraries' at WARNING (INFO if ``verbose``).

    Library warnings (Opacus, shap) go through logging, not lost.
    """
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    logging.captureWarnings(True)
