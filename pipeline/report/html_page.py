"""Render the report's content tree as ONE self-contained HTML file, through Jinja2 templates.

The page is ``templates/report.html.j2`` and one template per section (``templates/<section>.html.j2``);
this module gives them the content tree, the figures and the few derived values they show. Inline CSS,
figures as base64 ``data:`` URIs, no scripts and no external fetches (a Content-Security-Policy says so
to the browser). Autoescape is on: every value reaches the page through :func:`pipeline.report.fmt.esc`
(``html.escape``), so a column named ``<script>alert(1)</script>`` shows as text.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Mapping

from markupsafe import Markup

from auditml_core.codebook import describe
from auditml_core.models import MODELS
from pipeline.report.audit import tpr_rows
from pipeline.report.fmt import metric_name, sig3
from pipeline.report.sentences import (
    WHY_NOT_RIDGE,
    baseline_sentence,
    randomisation_sentence,
    reference_sentence,
    replication_cell,
)
from pipeline.report.templating import html_environment
from pipeline.report.verdicts_students import CLOSE_FIDELITY

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1400px;
padding:0 1.5em;color:#1b1b1b;line-height:1.45;display:grid;grid-template-columns:12.5em minmax(0,1fr);gap:0 2em}
nav.toc{position:sticky;top:0;align-self:start;max-height:100vh;overflow-y:auto;padding:1em 0;font-size:.85em}
nav.toc ol{list-style:none;padding-left:.9em;margin:.3em 0}nav.toc>ol{padding-left:0}nav.toc li{margin:.15em 0}nav.toc .toc-title{font-weight:600;margin:0}
main{min-width:0;padding:.6em 0 2em}header h1{margin:.2em 0 .1em;font-size:1.6em}header p{margin:.2em 0}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.5em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em;display:block;max-width:100%;overflow-x:auto}
table table{display:table}code{overflow-wrap:anywhere}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}.box{background:#f7f9fc;border-left:4px solid #3a6ea5;
padding:.6em 1em;margin:.8em 0}.warn{border-left-color:#c0392b;background:#fdf3f2}
p.lead{font-size:1.02em;max-width:60em}
figure{margin:1em 0;border:1px solid #e3e3e3;padding:.5em}figure img{max-width:100%;height:auto}
figcaption{font-size:.9em;color:#333}.howto{font-size:.88em;color:#444}.lookfor{font-size:.9em;margin:.2em 0}
code,pre{font-family:ui-monospace,monospace;font-size:.85em}
pre{background:#f5f5f5;padding:.6em;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
.small{font-size:.85em;color:#555}details{margin:.5em 0}details>summary{cursor:pointer}
table.wrap{display:table;table-layout:fixed;width:100%}table.wrap td,table.wrap th{overflow-wrap:anywhere}
section#verdicts h2{margin-top:.5em}table.verdicts{display:table;table-layout:fixed;width:100%;font-size:.92em}
table.verdicts td,table.verdicts th{padding:.35em .55em;overflow-wrap:break-word}
table.verdicts td.numbers{font-variant-numeric:tabular-nums;font-size:.9em}table.verdicts td.numbers span.n{display:block}
table.verdicts details.more{margin:0}table.verdicts details.more>summary{color:#555}
header p.settings{margin:.3em 0 0;font-size:.9em}header p.settings.changed{border-left:4px solid #f0b429;padding-left:.5em}
.badge{display:inline-block;padding:.1em .45em;border-radius:.3em;font-weight:600;white-space:nowrap;font-size:.9em}
.st-failed .badge{background:#c0392b;color:#fff}.st-caveat .badge{background:#f0b429;color:#1b1b1b}
.st-holds .badge{background:#2e7d32;color:#fff}.st-na .badge{background:#e0e0e0;color:#333}
tr.st-failed{background:#fdf3f2}tr.st-caveat{background:#fffaf0}
p.verdict{border-left:4px solid #999;padding:.3em .8em;margin:.6em 0}p.verdict.st-failed{border-left-color:#c0392b}
p.verdict.st-caveat{border-left-color:#f0b429}p.verdict.st-holds{border-left-color:#2e7d32}
@media screen and (max-width:900px){body{display:block}nav.toc{position:static;max-height:none}}
@media print{body{display:block;max-width:none}nav.toc{display:none}figure,tr{break-inside:avoid}a{color:inherit}}
"""


def data_uri(png: bytes) -> str:
    """A PNG as an inline ``data:`` URI (base64)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --------------------------------------------------------------------------- figures drawn here


def training_curves_png(history: list[Mapping[str, Any]], title: str) -> bytes | None:
    """Loss curves per epoch or round (and ε where recorded), or None without a history."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not history:
        return None
    xkey = "epoch" if "epoch" in history[0] else ("round" if "round" in history[0] else None)
    xs = [h.get(xkey, i + 1) if xkey else i + 1 for i, h in enumerate(history)]
    losses = [k for k in dict.fromkeys(k for h in history for k in h) if "loss" in k]
    eps_key = next((k for k in ("epsilon", "epsilon_max") if any(h.get(k) for h in history)), None)
    fig = Figure(figsize=(9 if eps_key else 5, 3))
    axes = fig.subplots(1, 2 if eps_key else 1, squeeze=False)[0]
    for k in losses:
        pts = [(x, h[k]) for x, h in zip(xs, history) if isinstance(h.get(k), (int, float))]
        if pts:
            axes[0].plot(*zip(*pts), label=k)
    for ax in axes:  # epochs and rounds are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_xlabel(xkey or "step")
    axes[0].set_ylabel("loss")
    axes[0].set_title(title, fontsize=10)
    if losses:
        axes[0].legend(fontsize=9)
    if eps_key:
        pts = [(x, h[eps_key]) for x, h in zip(xs, history) if isinstance(h.get(eps_key), (int, float))]
        axes[1].plot(*zip(*pts), marker="o")
        axes[1].set_xlabel(xkey or "step")
        axes[1].set_ylabel(f"ε spent ({eps_key})")
        axes[1].set_title("privacy budget spent", fontsize=10)
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


_CURVE_SERIES = {  # loss key -> what it is, per x unit
    ("epoch", "train_loss"): "training split",
    ("round", "train_loss"): "the clients' own training rows (their last local epoch, weighted by rows)",
    ("epoch", "val_loss"): "validation split",
    ("round", "val_loss"): "validation split, global model after the round",
    ("epoch", "test_loss"): "test split",
    ("round", "test_loss"): "test split",
}


def curve_note(history: list[Mapping[str, Any]]) -> str:
    """How to read :func:`training_curves_png` of ``history``: the series it draws, named from the history's keys."""
    if not history:
        return ""
    unit = "epoch" if "epoch" in history[0] else "round" if "round" in history[0] else "step"
    losses = [k for k in dict.fromkeys(k for h in history for k in h) if "loss" in k]
    series = "; ".join(f"{k} ({_CURVE_SERIES.get((unit, k), k)})" for k in losses) or "none recorded"
    note = f"Loss per {unit}: {series}."
    if unit == "round" and "test_loss" not in losses:
        note += " The test split is not drawn: it is evaluated once, after the last round (final_metrics)."
    return note + " The right panel, when present, shows the privacy budget ε spent so far."


def figures(explain_out: Any, trained: Any) -> dict[str, bytes]:
    """Every figure the page embeds: the explain stage's plots (by run-directory path) and training curves."""
    out = {f"explain/plots/{f}": png for me in explain_out.models.values() for f, png in me.plots.items()}
    for name, m in trained.models.items():
        png = training_curves_png(list(m.training.get("history") or []), f"{name} training")
        if png:
            out[f"training/{name}"] = png
    return out


# --------------------------------------------------------------------------- values the templates show


def record_columns(records: list[Mapping[str, Any]]) -> list[str]:
    """Every key of a list of records, in first-seen order (the columns of a records table)."""
    return list(dict.fromkeys(k for r in records for k in r))


def head_and_tail(records: list[Any], limit: int) -> list[Any]:
    """All records when at most ``limit``, else the first and last ``limit // 2`` with None between them."""
    return records if len(records) <= limit else records[: limit // 2] + [None] + records[-limit // 2 :]


def data_facts(d: Mapping[str, Any]) -> dict[str, Any]:
    """One dataset's provenance table: the source first, then its other provenance fields, shape and file hashes."""
    prov = d.get("provenance", {})
    return {
        "source": prov.get("source"),
        **{k: v for k, v in prov.items() if k != "source"},
        "input shape": d.get("input_shape"),
        "recorded files (SHA-256)": d.get("files", {}),
    }


def split_role(split: str, c: Mapping[str, Any]) -> str:
    """What ``split`` did in the run the content ``c`` describes."""
    return _split_role(split, dp=c["privacy"]["enabled"], val=_val_role(c))


def _val_role(c: Mapping[str, Any]) -> str:
    """What the validation split did in this run, from the training records (early stopping is off under DP)."""
    records = {m.get("title", n): m.get("training") or {} for n, m in (c.get("models") or {}).items()}
    on = [t for t, r in records.items() if str(r.get("early_stopping", "")).startswith("on")]
    if on:
        return f"validation metrics; early stopping chose the released epoch of: {', '.join(on)}"
    known = any("early_stopping" in r or r.get("mode") == "federated" for r in records.values())  # federated: none
    if known or c["privacy"]["enabled"]:
        why = "off under DP" if c["privacy"]["enabled"] else "off"
        return f"validation metrics only (early stopping {why}: the released weights are not chosen on it)"
    return "validation / early stopping"  # a record from before early_stopping was recorded


def _split_role(split: str, *, dp: bool, val: str = "validation / early stopping") -> str:
    return {
        "train": "fits the models (private; the only split DP protects)"
        if dp
        else "fits the models (private; no DP in this run, nothing protects it)",
        "val": val,
        "test": "final metrics and explained rows",
        "public": "declared public: explanation backgrounds, distillation",
    }.get(split, "")


def training_and_history(training: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """A model's training record without its history, and the history (shown as a table and a figure)."""
    t = dict(training)
    return t, t.pop("history", None)


def confusion_peak(cm: list[list[float]]) -> float:
    """The largest count of a confusion matrix (1 when it is empty or all zero): the darkest shade."""
    return max((max(r) for r in cm), default=1) or 1


def shade(value: float, peak: float) -> str:
    """The alpha of a confusion-matrix cell's background (two decimals)."""
    return f"{0.8 * value / peak:.2f}"


_PRIVACY_KEY_FIELDS = (
    "mechanism",
    "epsilon",
    "delta",
    "target_epsilon",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "total_steps",
    "accountant",
    "opacus_version",
    "noise_source",
    "floating_point_safe_noise",
    "unit_of_privacy",
)


def privacy_record_parts(rec: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A model's privacy record split into the fields shown first and the rest (folded away)."""
    main = {k: rec.get(k) for k in _PRIVACY_KEY_FIELDS if k in rec}
    return main, {k: v for k, v in rec.items() if k not in _PRIVACY_KEY_FIELDS}


def canary_runs(m: Mapping[str, Any], control_who: str) -> list[tuple[str, Mapping[str, Any]]]:
    """(who, canary record) of the released model's training and of the positive control, those that ran."""
    pairs = (("released model's training", m["canaries"]), (control_who, m["control"].get("canaries") or {}))
    return [(who, c) for who, c in pairs if c.get("ran")]


def ranked_importance(importance: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Features by decreasing mean |SHAP| (None last)."""
    return sorted(importance.items(), key=lambda kv: -(kv[1] or 0))


def join_str(values: list[Any]) -> str:
    """Values as one comma-separated string (escaped as a whole where it is shown)."""
    return ", ".join(map(str, values))


def reproducibility_facts(r: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The run-identity table of the Reproducibility section (``shown``) and the raw records folded under it."""
    return {
        "shown": {
            "run id": r["run_id"],
            "git commit": r["git_commit"],
            # the resolved train.device setting: what was available, not where each stage ran
            "train.device (resolved)": r["device"],
            "device per stage": r.get("stage_devices") or "(not recorded)",
            "platform": r["platform"],
            "python": r["python_executable"],
            "root seed": r["root_seed"],
        },
        "folded": {
            "seeds per stage": r["seeds"],
            "stage seconds": r["stage_seconds"],
            "library versions": r["library_versions"],
        },
    }


def _diabetes_data(c: Mapping[str, Any], name: str) -> bool:
    """Whether model ``name`` was trained on scikit-learn's (already scaled) diabetes data, not a user's file."""
    entry = MODELS.get(name)
    d = (c.get("data") or {}).get(entry.dataset if entry is not None else "") or {}
    return "load_diabetes" in str((d.get("provenance") or {}).get("source", ""))


def _plots_of(c: Mapping[str, Any], model: str, kind: str) -> list[Mapping[str, Any]]:
    """The explain stage's plots of one kind for a model (with their hashes), as listed in the content."""
    plots = c["explanations"]["models"].get(model, {}).get("plots", [])
    return [p for p in plots if p["kind"] == kind]


_VARIANT_COLUMNS = (
    ("model", "model"),
    ("labels", "variants"),
    ("methods", "methods"),
    ("n", "inputs"),
    ("k", "k"),
    ("global_spearman", "global Spearman"),
    ("global_topk", "global top-k"),
    ("global_l1", "L1 of importances"),
    ("mean_row_spearman", "row Spearman"),
    ("mean_row_topk", "row top-k"),
)


SECTIONS = (
    ("summary", "Models at a glance"),
    ("data", "Data provenance"),
    ("models", "Models"),
    ("privacy", "Privacy"),
    ("audit", "Privacy audit (membership inference)"),
    ("explanations", "Explanations"),
    ("distill", "Distillation"),
    ("not-covered", "What this report does not cover"),
    ("annex-iv", "EU AI Act Annex IV map"),
    ("reproducibility", "Reproducibility"),
)


_STATUS = {  # status -> (CSS class, mark): the mark says it without colour
    "failed": ("st-failed", "✗"),
    "holds with caveat": ("st-caveat", "!"),
    "holds": ("st-holds", "✓"),
    "not applicable": ("st-na", "–"),
}


def status_class(status: str) -> str:
    """The CSS class of a verdict's status."""
    return _STATUS[status][0]


def status_mark(status: str) -> str:
    """A one-character mark for a verdict's status (read without colour, and in print)."""
    return _STATUS[status][1]


def verdict_of(c: Mapping[str, Any], area: str) -> Mapping[str, Any] | None:
    """The verdict of ``area`` in the content's summary, or None."""
    return next((v for v in (c.get("summary") or {}).get("verdicts") or [] if v["area"] == area), None)


def artifact_sha256(c: Mapping[str, Any], path: str) -> str | None:
    """The SHA-256 the report read for an earlier stage's file (from the manifest), or None."""
    return next((a.get("sha256") for a in c["reproducibility"]["artifacts"] if a["path"] == path), None)


def figure_id(path: str) -> str:
    """A figure's anchor from its file: explain/plots/cnn_image_grid.png -> fig-cnn-image-grid."""
    stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return "fig-" + "".join(ch if ch.isalnum() else "-" for ch in stem.lower()).strip("-")


LOOK_FOR = {  # per figure kind: what a reader should look for first (the "how to read" note says the rest)
    "beeswarm": "features whose dots reach far from 0 (they move predictions most) and whether high values (yellow) "
    "sit right of 0 (they push the prediction up).",
    "importance_bar": "whether SHAP and LIME put the same features on top; where they differ, trust neither alone.",
    "waterfall": "the few longest bars: they carry this row's prediction away from the average.",
    "deletion_insertion": "the solid curve below the dashed one on the left and above it on the right: then the "
    "explanation is faithful to the model.",
    "image_grid": "red where the digit's strokes are, and the same places in SHAP and LIME; noise everywhere means "
    "the map shows little.",
    "dependence": "a clear rising or falling cloud (the direction of the effect) and vertical spread that sorts by "
    "colour (an interaction).",
    "pdp": "ICE lines that run parallel (an additive feature) or cross and fan (interactions the average hides).",
    "misclassified": "a repeated confusion (one pair of classes, one writing style) rather than single images.",
    "training": "validation loss that rises while training loss falls (overfitting) and, under DP, ε growing to its "
    "target by the last step.",
}


def look_for(kind: str) -> str:
    """What to look for first in a figure of ``kind`` ('' for an unknown kind)."""
    return LOOK_FOR.get(kind, "")


# --------------------------------------------------------------------------- rendering

_GLOBALS = {
    "baseline_sentence": baseline_sentence,
    "canary_runs": canary_runs,
    "tpr_rows": tpr_rows,
    "confusion_peak": confusion_peak,
    "curve_note": curve_note,
    "data_facts": data_facts,
    "describe": describe,
    "diabetes_data": _diabetes_data,
    "head_and_tail": head_and_tail,
    "join_str": join_str,
    "plots_of": _plots_of,
    "privacy_record_parts": privacy_record_parts,
    "randomisation_sentence": randomisation_sentence,
    "ranked_importance": ranked_importance,
    "record_columns": record_columns,
    "reference_sentence": reference_sentence,
    "replication_cell": replication_cell,
    "reproducibility_facts": reproducibility_facts,
    "shade": shade,
    "split_role": split_role,
    "training_and_history": training_and_history,
    "variant_columns": _VARIANT_COLUMNS,
    "why_not_ridge": WHY_NOT_RIDGE,
    "status_class": status_class,
    "status_mark": status_mark,
    "verdict_of": verdict_of,
    "artifact_sha256": artifact_sha256,
    "figure_id": figure_id,
    "look_for": look_for,
    "metric_name": metric_name,
    "close_fidelity": CLOSE_FIDELITY,
}


def _environment():
    env = html_environment()
    if "data_uri" not in env.filters:
        env.filters["data_uri"] = data_uri
        env.filters["people"] = sig3
        env.globals.update(_GLOBALS)
    return env


def sections(content: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The page's evidence sections (anchor, title) in order, as the table of contents lists them after the
    verdicts."""
    listed = list(SECTIONS)  # Distillation too without a distill stage: the students verdict links to it
    return [s for s in listed if s[0] != "annex-iv" or "annex_iv" in content]


def render_section(anchor: str, content: Mapping[str, Any], figs: Mapping[str, bytes] | None = None) -> Markup:
    """One section of the page alone (``anchor`` as in :data:`SECTIONS`), e.g. to test it on a partial content."""
    template = _environment().get_template(anchor.replace("-", "_") + ".html.j2")
    return Markup(template.render(c=content, figs=figs or {}))


def render(content: Mapping[str, Any], figs: Mapping[str, bytes]) -> str:
    """The complete HTML page."""
    title = f"{content['title']} {content.get('run_id') or ''}".strip()
    return (
        _environment()
        .get_template("report.html.j2")
        .render(c=content, figs=figs, title=title, sections=sections(content), csp=CSP, css=CSS)
    )
