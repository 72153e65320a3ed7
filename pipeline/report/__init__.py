"""Stage ``report``: one self-contained ``report.html``, ``report.json``, a model card per model and ``report.pdf``.

The content is built once (:mod:`pipeline.report.content`), ``report.json`` holds it as it
is (schema: ``pipeline/report/report_schema.json``) and the HTML page and the model cards
render it. The report cannot list its own hashes: those are in ``manifest.json`` (stage
``report``), which ``python -m pipeline verify RUN_DIR`` checks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from auditml_core.artifacts import json_bytes, read_json
from auditml_core.config import Config
from auditml_core.models import MODELS
from pipeline.report import html_page, model_card, pdf
from pipeline.report.content import FILES, SCHEMA_ID, build_content

SCHEMA_PATH = Path(__file__).with_name("report_schema.json")
PROVENANCE_FILE = "report_provenance.json"  # the manifest exactly as the report read it; its SHA-256 is in the header
__all__ = [
    "FILES",
    "PROVENANCE_FILE",
    "SCHEMA_ID",
    "SCHEMA_PATH",
    "Report",
    "build_content",
    "dump",
    "load",
    "prepare",
    "run",
    "schema",
    "validate",
]


@dataclass(frozen=True)
class Report:
    """The stage output: the content tree and its renderings."""

    content: Mapping[str, Any]  # what report.json holds
    html: str
    model_cards: Mapping[str, str]  # model -> Markdown
    provenance: bytes = b""  # the manifest as the report read it (written as report_provenance.json)
    pdf: bytes = b""  # report.pdf (pipeline/report/pdf.py); b"" when none was produced (content says why)


def prepare(cfg: Config) -> None:
    """Import what the stage loads lazily (WeasyPrint with Pango, jsonschema: ~0.8 s on the default run's
    machine) and warm WeasyPrint up (:func:`pdf.warm_up`); the runner calls it while it waits for the last jobs
    before this stage, on a CPU they leave idle."""
    if cfg.report.pdf and pdf.unavailable() is None:  # imports WeasyPrint (and records why not, once)
        pdf.warm_up()
    import jsonschema  # noqa: F401


def run(cfg: Config, inputs: Mapping[str, Any], *, seed: int, runtime: Any = None) -> Report:
    """Build the report from every earlier stage's output.

    Parameters
    ----------
    cfg : resolved configuration.
    inputs : ``data``, ``train``, ``evaluate``, ``explain``, ``provenance`` (the manifest:
        artifact hashes, seeds, versions) and ``distill`` when the run has it.
    seed : stage seed (recorded; the report draws nothing at random).
    runtime : unused.

    Returns
    -------
    Report
    """
    provenance = json_bytes(inputs.get("provenance") or {})
    inputs = {**inputs, "provenance_sha256": hashlib.sha256(provenance).hexdigest()}
    content = build_content(cfg, inputs, seed=seed)
    validate(content)  # before the page and its PDF (seconds) are made; again below with the PDF's fields
    figures = html_page.figures(inputs["explain"], inputs["train"])
    content, html, pdf_bytes = pdf.with_pdf(  # report.pdf: the same page printed, or the content says why not
        content,
        lambda c: html_page.render(c, figures),
        enabled=cfg.report.pdf,
        manifest_sha256=inputs["provenance_sha256"],
        created=(inputs.get("provenance") or {}).get("created"),
    )
    validate(content)
    cards = {name: model_card.render(content, name) for name in MODELS}
    return Report(content=content, html=html, model_cards=cards, provenance=provenance, pdf=pdf_bytes)


def dump(report: Report) -> dict[str, bytes]:
    """``report.html``, ``report.json`` and the model cards, at the top of the run directory."""
    files = {FILES["html"]: report.html.encode("utf-8"), FILES["json"]: json_bytes(report.content)}
    if report.provenance:
        files[PROVENANCE_FILE] = report.provenance
    if report.pdf:
        files[pdf.FILE] = report.pdf
    for name, text in report.model_cards.items():
        files[FILES["model_cards"][name]] = text.encode("utf-8")
    return files


def load(read: Callable[[str], bytes]) -> Report:
    """Rebuild the stage output from the run directory."""
    cards = {name: read(rel).decode("utf-8") for name, rel in FILES["model_cards"].items()}
    content = read_json(read(FILES["json"]))
    produced = ((content.get("reproducibility") or {}).get("pdf") or {}).get("produced")
    return Report(
        content=content,
        html=read(FILES["html"]).decode("utf-8"),
        model_cards=cards,
        provenance=read(PROVENANCE_FILE),
        pdf=read(pdf.FILE) if produced else b"",
    )


def validate(content: Mapping[str, Any]) -> None:
    """Check the content, as ``report.json`` will hold it, against :func:`schema` before anything is written.

    Raises
    ------
    ValueError
        Naming the first violation's path and message: a report that breaks its own schema is a bug
        in the stage that produced the value, never something to write and fix later.
    """
    import jsonschema  # lazy: only the report stage needs it (~0.1 s import)

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(read_json(json_bytes(content))), key=lambda e: list(e.absolute_path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
        raise ValueError(
            f"report.json would break its schema at {where}: {errors[0].message} "
            f"({len(errors)} violation(s)); fix the stage that produced this value."
        )


def schema() -> dict[str, Any]:
    """The JSON Schema that ``report.json`` follows."""
    return read_json(SCHEMA_PATH.read_bytes())
