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
from pipeline.report.sentences import (
    WHY_NOT_RIDGE,
    baseline_sentence,
    randomisation_sentence,
    reference_sentence,
    replication_cell,
)
from pipeline.report.templating import html_environment

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1100px;
padding:1em 1.5em;color:#1b1b1b;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.5em}
nav ol{columns:2}table{border-collapse:collapse;margin:.6em 0;font-size:.9em;display:block;max-width:100%;
overflow-x:auto}table table{display:table}code{overflow-wrap:anywhere}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}.box{background:#f7f9fc;border-left:4px solid #3a6ea5;
padding:.6em 1em;margin:.8em 0}.warn{border-left-color:#c0392b;background:#fdf3f2}
figure{margin:1em 0;border:1px solid #e3e3e3;padding:.5em}figure img{max-width:100%;height:auto}
figcaption{font-size:.9em;color:#333}.howto{font-size:.88em;color:#444}code,pre{font-family:ui-monospace,monospace;
font-size:.85em}pre{background:#f5f5f5;padding:.6em;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
.small{font-size:.85em;color:#555}details{margin:.5em 0}
table.wrap{display:table;table-layout:fixed;width:100%}table.wrap td,table.wrap th{overflow-wrap:anywhere}
@media print{nav{display:none}figure{break-inside:avoid}}
"""


def data_uri(png: bytes) -> str:
    """A PNG as an inline ``data:`` URI (base64)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --------------------------------------------------------------------------- figures drawn here


def training_curves_png(history: list[Mapping[str, Any]], title: str) -> bytes | None:
    """Loss curves per epoch or round (and ε where recorded), or None without a history."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
    axes[0].set_xlabel(xkey or "step")
    axes[0].set_ylabel("loss")
    axes[0].set_title(title, fontsize=9)
    if losses:
        axes[0].legend(fontsize=7)
    if eps_key:
        pts = [(x, h[eps_key]) for x, h in zip(xs, history) if isinstance(h.get(eps_key), (int, float))]
        axes[1].plot(*zip(*pts), marker="o")
        axes[1].set_xlabel(xkey or "step")
        axes[1].set_ylabel(f"ε spent ({eps_key})")
        axes[1].set_title("privacy budget spent", fontsize=9)
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
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


def reproducibility_facts(r: Mapping[str, Any]) -> dict[str, Any]:
    """The run-identity table of the Reproducibility section."""
    return {
        "run id": r["run_id"],
        "git commit": r["git_commit"],
        # the resolved train.device setting: what was available, not where each stage ran
        "train.device (resolved)": r["device"],
        "device per stage": r.get("stage_devices") or "(not recorded)",
        "platform": r["platform"],
        "python": r["python_executable"],
        "root seed": r["root_seed"],
        "seeds per stage": r["seeds"],
        "stage seconds": r["stage_seconds"],
        "library versions": r["library_versions"],
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
    ("summary", "Summary"),
    ("data", "Data provenance"),
    ("models", "Models"),
    ("privacy", "Privacy"),
    ("audit", "Privacy audit (membership inference)"),
    ("explanations", "Explanations"),
    ("annex-iv", "EU AI Act Annex IV map"),
    ("reproducibility", "Reproducibility"),
)


# --------------------------------------------------------------------------- rendering

_GLOBALS = {
    "baseline_sentence": baseline_sentence,
    "canary_runs": canary_runs,
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
}


def _environment():
    env = html_environment()
    if "data_uri" not in env.filters:
        env.filters["data_uri"] = data_uri
        env.globals.update(_GLOBALS)
    return env


def sections(content: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The page's sections (anchor, title) in order, as the table of contents lists them."""
    listed = [*SECTIONS[:6], ("distill", "Distillation"), *SECTIONS[6:]] if "distill" in content else list(SECTIONS)
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
