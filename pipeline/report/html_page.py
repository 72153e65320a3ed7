"""Render the report's content tree as ONE self-contained HTML file.

Inline CSS, figures as base64 ``data:`` URIs, no scripts and no external
fetches (a Content-Security-Policy says so to the browser). Every value is
passed through :func:`esc` (``html.escape``) on its way into the page, so a
column named ``<script>alert(1)</script>`` shows as text.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Iterable, Mapping

from auditml_core.codebook import describe
from auditml_core.models import MODELS
from pipeline.report.fmt import esc, number
from pipeline.report.sentences import (
    WHY_NOT_RIDGE,
    baseline_sentence,
    randomisation_sentence,
    reference_sentence,
    replication_cell,
)

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


def fmt(value: Any, digits: int = 4) -> str:
    """A number for the page (escaped), None as an em dash."""
    return esc(number(value, digits))


def ci(value: Any, interval: Any) -> str:
    """``value [lo, hi]`` for a metric with its 95% confidence interval."""
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        return f"{fmt(value)} <span class=small>[{fmt(interval[0])}, {fmt(interval[1])}]</span>"
    return fmt(value)


def data_uri(png: bytes) -> str:
    """A PNG as an inline ``data:`` URI (base64)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --------------------------------------------------------------------------- generic tables


def value_html(value: Any, depth: int = 0) -> str:
    """Any JSON-safe value as HTML: scalars, short lists inline, mappings as nested tables, record lists as tables."""
    if isinstance(value, Mapping):
        return kv_table(value, depth + 1) if value else "—"
    if isinstance(value, list):
        if value and all(isinstance(v, Mapping) for v in value):
            return records_table(value)
        if len(value) > 24:
            shown = ", ".join(fmt(v) for v in value[:12])
            return f"{shown}, … <span class=small>({len(value)} items)</span>"
        return ", ".join(value_html(v, depth + 1) for v in value) if value else "—"
    if isinstance(value, str) and "\n" in value:
        return f"<pre>{esc(value)}</pre>"
    return fmt(value)


def kv_table(mapping: Mapping[str, Any], depth: int = 0) -> str:
    """A two-column table of a mapping (nested mappings nest)."""
    if depth > 6:
        return esc(mapping)
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{value_html(v, depth)}</td></tr>" for k, v in mapping.items())
    return f"<table>{rows}</table>"


def records_table(records: list[Mapping[str, Any]], *, limit: int = 12) -> str:
    """A table of homogeneous records (training history, per-round records); long lists show head and tail."""
    cols = list(dict.fromkeys(k for r in records for k in r))
    shown = records if len(records) <= limit else records[: limit // 2] + [None] + records[-limit // 2 :]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for r in shown:
        if r is None:
            body.append(f"<tr><td colspan={len(cols)} class=small>… {len(records) - limit} more …</td></tr>")
            continue
        body.append("<tr>" + "".join(f"<td class=num>{value_html(r.get(c), 7)}</td>" for c in cols) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """A table from already-escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def bullet_list(items: Iterable[str], cls: str = "") -> str:
    """An escaped bulleted list, or "None." when empty."""
    items = list(items)
    if not items:
        return "<p>None.</p>"
    return f"<ul{' class=' + cls if cls else ''}>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>"


def figure(png: bytes | None, title: str, how_to_read: str, caption: str = "") -> str:
    """An embedded figure with its title, caption and a "how to read this" note."""
    if not png:
        return f"<p class=small>(figure {esc(title)} is missing)</p>"
    return (
        f'<figure><img src="{data_uri(png)}" alt="{esc(title)}"><figcaption><strong>{esc(title)}</strong>'
        f"{' — ' + esc(caption) if caption else ''}<div class=howto><em>How to read this:</em> {esc(how_to_read)}"
        "</div></figcaption></figure>"
    )


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


# --------------------------------------------------------------------------- sections


def _summary(c: Mapping[str, Any]) -> str:
    s = c["summary"]
    rows = []
    for m in s["models"]:
        h = m["headline"]
        rows.append(
            [
                esc(m["title"]),
                fmt(m["n_parameters"]),
                esc(m["mode"] or "—"),
                f"test {esc(h['metric'])} = {ci(h['value'], h['ci95'])} (n = {fmt(h['n'])})",
            ]
        )
    b = s["baseline"]
    rows.append(["Ridge baseline (not DP)", "—", "central", f"test {esc(b['metric'])} = {ci(b['value'], b['ci95'])}"])
    versus = baseline_sentence(b.get("comparison"))
    cls = "box" if c["privacy"]["enabled"] else "box warn"
    return (
        "<section id=summary><h2>Summary</h2>"
        + table(["model", "parameters", "training", "headline metric [95% CI]"], rows)
        + (f"<p>{esc(versus[0].upper() + versus[1:])}.</p>" if versus else "")
        + f"<div class='{cls}'><strong>Privacy:</strong> {esc(s['privacy'])}</div>"
        + f"<div class=box><strong>Explanation quality:</strong> {esc(s['explanations'])}</div>"
        + f"<p>{fmt(s['n_caveats'])} caveat(s) are listed in the privacy, privacy-audit and explanation sections.</p></section>"
    )


def _data(c: Mapping[str, Any]) -> str:
    parts = ["<section id=data><h2>Data provenance</h2>"]
    for key, d in c["data"].items():
        prov = d.get("provenance", {})
        parts.append(f"<h3>{esc(key)}: {esc(d['task'])}</h3>")
        parts.append(
            kv_table(
                {
                    "source": prov.get("source"),
                    **{k: v for k, v in prov.items() if k != "source"},
                    "input shape": d.get("input_shape"),
                    "recorded files (SHA-256)": d.get("files", {}),
                }
            )
        )
        sizes = d["sizes"]
        dp, val = c["privacy"]["enabled"], _val_role(c)
        rows = [[esc(s), fmt(n), esc(_split_role(s, dp=dp, val=val))] for s, n in sizes.items()]
        parts.append(table(["split", "rows", "role"], rows))
        if d.get("feature_names"):
            parts.append(
                f"<p>Features: {', '.join(f'<code>{esc(n)}</code>' for n in d['feature_names'])}; "
                f"target: <code>{esc(d.get('target_name', ''))}</code>.</p>"
            )
        if d.get("codebook"):
            rows = [[f"<code>{esc(col)}</code>", esc(u), esc(codes)] for col, u, codes in describe(d["codebook"])]
            parts.append("<h4>Data dictionary (data.codebook)</h4>" + table(["column", "units", "codes"], rows))
        if d.get("class_names"):
            counts = d.get("class_counts", {})
            rows = [
                [esc(cn)] + [fmt(counts.get(s, [])[i] if i < len(counts.get(s, [])) else None) for s in sizes]
                for i, cn in enumerate(d["class_names"])
            ]
            parts.append(
                "<details><summary>Class counts per split</summary>"
                + table(["class", *map(esc, sizes)], rows)
                + "</details>"
            )
        parts.append(
            "<details><summary>Preprocessing (fitted on the training split only)</summary>"
            + kv_table(d.get("preprocessing", {}))
            + "</details>"
        )
    parts.append("</section>")
    return "".join(parts)


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


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    rows = []
    for split in ("test", "val"):
        mm = metrics.get(split)
        if not mm:
            continue
        for key, value in mm.items():
            if key.endswith("_ci95") or not isinstance(value, (int, float)) or key == "n":
                continue
            rows.append([esc(split), esc(key), ci(value, mm.get(f"{key}_ci95")), fmt(mm.get("n"))])
    return table(["split", "metric", "value [95% bootstrap CI]", "n"], rows)


def _per_class(metrics: Mapping[str, Any]) -> str:
    test = metrics.get("test", {})
    names = test.get("class_names") or []
    cm = test.get("confusion_matrix") or []
    if not names or not cm:
        return ""
    rec, prec = test.get("per_class_recall", {}), test.get("per_class_precision", {})
    rows = [
        [esc(n), fmt(rec.get(n)), fmt(prec.get(n)), fmt(int(sum(cm[i])) if i < len(cm) else None)]
        for i, n in enumerate(names)
    ]
    out = "<h4>Per-class results (test)</h4>" + table(["class", "recall", "precision", "support"], rows)
    peak = max((max(r) for r in cm), default=1) or 1
    head = "<th>true \\ predicted</th>" + "".join(f"<th>{esc(n)}</th>" for n in names)
    body = ""
    for i, r in enumerate(cm):
        cells = "".join(
            f"<td class=num style='background:rgba(58,110,165,{0.8 * v / peak:.2f})'>{fmt(v)}</td>" for v in r
        )
        body += f"<tr><th>{esc(names[i])}</th>{cells}</tr>"
    return out + f"<h4>Confusion matrix (test)</h4><table><tr>{head}</tr>{body}</table>"


def _diabetes_data(c: Mapping[str, Any], name: str) -> bool:
    """Whether model ``name`` was trained on scikit-learn's (already scaled) diabetes data, not a user's file."""
    entry = MODELS.get(name)
    d = (c.get("data") or {}).get(entry.dataset if entry is not None else "") or {}
    return "load_diabetes" in str((d.get("provenance") or {}).get("source", ""))


def _subgroups(metrics: Mapping[str, Any], *, diabetes: bool = False) -> str:
    """Test error per subgroup (sex, age band) where the evaluate stage measured it.

    The units note names scikit-learn's diabetes scaling only for that data (``diabetes``), never for a user's file.
    """
    units = (
        "Group values are in the dataset's units (scikit-learn's diabetes features are already mean-centred and scaled)."
        if diabetes
        else "Group values are in the dataset's units."
    )
    groups = (metrics.get("test") or {}).get("subgroups") or {}
    parts = []
    for feat, g in groups.items():
        rows = [
            [esc(r["group"]), fmt(r["n"]), ci(r["mae"], r.get("mae_ci95")), fmt(r["rmse"]), fmt(r["bias"])]
            for r in g["groups"]
        ]
        parts.append(
            f"<h4>Test error by <code>{esc(feat)}</code> ({esc(g['kind'])})</h4>"
            + table(["group", "n", "MAE [95% bootstrap CI]", "RMSE", "bias (mean prediction − target)"], rows)
            + f"<p class=small>Largest MAE gap between groups: {fmt(g['mae_gap'])} target units. Groups are small: "
            f"overlapping intervals do not show equal performance. {units}</p>"
        )
    return "".join(parts)


def _cohorts(metrics: Mapping[str, Any]) -> str:
    """The error-analysis cohorts of the test split (where the model is worst)."""
    co = (metrics.get("test") or {}).get("cohorts")
    if not co or not co.get("cohorts"):
        return ""
    rows = [
        [
            f"<code>{esc(r['rule'])}</code>",
            fmt(r["n"]),
            ci(r["mae"], r.get("mae_ci95")),
            fmt(r["mae_ratio"], 3),
            fmt(r["bias"]),
            esc(replication_cell(r.get("replication"))),
        ]
        for r in co["cohorts"]
    ]
    return (
        "<h4>Where the model is worst: error cohorts (test)</h4>"
        f"<p class=small>A regression tree of depth {fmt(co['max_depth'])} (each cohort at least "
        f"{fmt(co['min_leaf_rows'])} of {fmt(co['n'])} rows) fitted on the test rows' features to predict the "
        f"absolute error; each leaf is a cohort. Overall MAE {fmt(co['overall_mae'])}; the cohorts partition the "
        "rows, so their row-weighted MAEs average to it. <strong>Descriptive:</strong> "
        f"{esc(co['descriptive'])}. Thresholds are in the dataset's units."
        + (f" Replication: {esc(co['replication_note'])}." if co.get("replication_note") else "")
        + "</p>"
        + table(
            ["cohort (rule)", "n", "MAE [95% bootstrap CI]", "MAE / overall", "bias", "on the validation split"], rows
        )
    )


def _plots_of(c: Mapping[str, Any], model: str, kind: str) -> list[Mapping[str, Any]]:
    """The explain stage's plots of one kind for a model (with their hashes), as listed in the content."""
    plots = c["explanations"]["models"].get(model, {}).get("plots", [])
    return [p for p in plots if p["kind"] == kind]


def _class_errors(metrics: Mapping[str, Any], plots: list[Mapping[str, Any]], figs: Mapping[str, bytes]) -> str:
    """Per-class error analysis of a classifier: recall, the most-confused-with class, and example images."""
    rows_ = (metrics.get("test") or {}).get("per_class_errors")
    if not rows_:
        return ""
    rows = [
        [
            esc(r["class"]),
            fmt(r["support"]),
            fmt(r["errors"]),
            fmt(r["recall"]),
            "—"
            if r["most_confused_with"] is None
            else f"{esc(r['most_confused_with'])} ({fmt(r['most_confused_count'])})",
        ]
        for r in rows_
    ]
    out = "<h4>Per-class errors (test)</h4>" + table(
        ["true class", "support", "errors", "recall", "most often predicted instead (count)"], rows
    )
    for p in plots:
        out += figure(
            figs.get(p["file"]), p["title"], p["how_to_read"], caption=f"{p['file']} (SHA-256 {p['sha256'] or 'n/a'})"
        )
    return out


def _models(c: Mapping[str, Any], figs: Mapping[str, bytes]) -> str:
    parts = ["<section id=models><h2>Models</h2>"]
    for name, m in c["models"].items():
        t = dict(m["training"])
        history = t.pop("history", None)
        parts.append(f"<h3>{esc(m['title'])}</h3>")
        parts.append(kv_table({"architecture": m["spec"], "trainable parameters": m["n_parameters"]}))
        parts.append("<h4>Training settings and record</h4>" + kv_table(t))
        if history:
            parts.append(
                f"<details><summary>Training history ({len(history)} entries)</summary>"
                + records_table(history)
                + "</details>"
            )
            src = m.get("training_curves_source") or {}
            parts.append(
                figure(
                    figs.get(f"training/{name}"),
                    f"{m['title']}: training curves",
                    curve_note(history),
                    caption=f"drawn from {src.get('file', 'n/a')} (SHA-256 {src.get('sha256') or 'n/a'}): "
                    f"{src.get('what', 'the recorded training history')}",
                )
            )
        parts.append("<h4>Metrics</h4>" + _metrics_table(m["metrics"]))
        parts.append(_public_only(m.get("public_only_baseline")))
        parts.append(_trivial(m.get("trivial_baseline")))
        parts.append(_subgroups(m["metrics"], diabetes=_diabetes_data(c, name)))
        parts.append(_cohorts(m["metrics"]))
        parts.append(_per_class(m["metrics"]))
        parts.append(_class_errors(m["metrics"], _plots_of(c, name, "misclassified"), figs))
        if "baseline" in m:
            b = m["baseline"]
            parts.append(f"<h4>{esc(b['title'])}, alpha = {fmt(b['alpha'])}</h4>" + _metrics_table(b["metrics"]))
            if b.get("comparison"):
                parts.append(f"<p>{esc(baseline_sentence(b['comparison']))}. {esc(WHY_NOT_RIDGE)}</p>")
    parts.append("</section>")
    return "".join(parts)


def _trivial(tb: Mapping[str, Any] | None) -> str:
    """The model beside a predictor that ignores its input (majority class, training mean); a warning box at chance."""
    if not tb:
        return ""
    return f"<p class='{'box warn' if tb['no_better'] else 'small'}'>{esc(tb['statement'])}</p>"


def _public_only(po: Mapping[str, Any] | None) -> str:
    """A DP model beside the same architecture trained on the public split alone."""
    if not po:
        return ""
    if not po.get("available"):
        return f"<h4>Utility from the private data</h4><div class='box warn'>{esc(po['statement'])}</div>"
    cls = "box" if po["private_data_contributed"] else "box warn"
    rows = [
        ["released DP model", ci(po["released"], po.get("released_ci95"))],
        ["public split only (no private record)", ci(po["public_only"], po.get("public_only_ci95"))],
        ["added by DP training on the private split", ci(po["private_gain"], po.get("private_gain_ci95"))],
    ]
    return (
        "<h4>Utility from the private data</h4>"
        + table(["model", f"test {esc(po['metric'])} [95% CI]"], rows)
        + f"<div class='{cls}'>{esc(po['statement'])}</div>"
    )


def _attack_rows(attacks: list[Mapping[str, Any]], who: str, claimed: Any) -> list[list[str]]:
    rows = []
    for a in attacks:
        tprs = []
        for t in a["tpr_at_fpr"]:
            cell = f"{fmt(t['target_fpr'], 2)}: {ci(t['tpr'], t['tpr_ci95'])}"
            if t.get("dp_bound") is not None:
                cell += f" <span class=small>(DP bound {fmt(t['dp_bound'], 3)})</span>"
            if t.get("resolution_limited"):
                cell += " <span class=small>(no false positive)</span>"
            tprs.append(cell)
        rows.append(
            [
                esc(who),
                esc(a["attack"]),
                ci(a["auc"], a["auc_ci95"]),
                "<br>".join(tprs),
                f"{fmt(a['epsilon_lower_bound'], 3)} <span class=small>(optimistic "
                f"{fmt(a['epsilon_lower_bound_optimistic'], 3)})</span>",
                fmt(claimed, 4),
            ]
        )
    return rows


def _shadows_like_target(sh: Mapping[str, Any]) -> str:
    """One sentence comparing how the shadows and the audited model were trained (rows, epochs, σ, q)."""
    if "rows" not in sh:
        return ""
    dp, ref = sh.get("dp_settings") or {}, sh.get("audited_model_dp_settings") or {}
    sigma = (
        f", σ {fmt(dp.get('noise_multiplier'), 4)} and q {fmt(dp.get('sample_rate'), 4)} (audited: "
        f"{fmt(ref.get('noise_multiplier'), 4)}, {fmt(ref.get('sample_rate'), 4)})"
        if dp
        else ""
    )
    return (
        f" Each shadow trains on {fmt(sh['rows'])} rows for {fmt(sh['epochs'])} epochs, batch {fmt(sh['batch_size'])}"
        f"{sigma} (the audited model: {fmt(sh['audited_model_rows'])} rows, {fmt(sh['audited_model_epochs'])} "
        f"epochs), starting from {esc(sh['starting_weights'])}."
    )


def _canary_table(m: Mapping[str, Any], control_who: str) -> str:
    """The one-run canary audit of the released model's recipe and of the positive control, or ''."""
    rows = []
    for who, c, claimed in (
        ("released model's training", m["canaries"], m["claimed_epsilon"]),
        (control_who, m["control"].get("canaries") or {}, m["claimed_epsilon"]),
    ):
        if not c.get("ran"):
            continue
        best = c["best"]
        rows.append(
            [
                esc(who),
                esc(c["trained"]),
                f"{fmt(c['m'])} ({fmt(c['included'])} included)",
                f"{fmt(best['correct'])} of {fmt(best['r'])}",
                fmt(c["epsilon_lower_bound"], 3),
                fmt(c["certifiable_epsilon"], 3),
                fmt(claimed, 4),
                "<strong>FAILED</strong>"
                if claimed is not None and c["epsilon_lower_bound"] > claimed
                else "not refuted",
            ]
        )
    if not rows:
        return ""
    return "<h4>One-run audit with gradient canaries (Steinke, Nasr &amp; Jagielski 2023)</h4>" + table(
        [
            "model",
            "canaries ride in",
            "canaries",
            "correct guesses (best)",
            "ε lower bound",
            "certifiable ε",
            "claimed ε",
            "claim",
        ],
        rows,
    )


def _audit(c: Mapping[str, Any]) -> str:
    a = c["audit"]
    parts = ["<section id=audit><h2>Privacy audit (membership inference)</h2>"]
    parts.append(f"<p class=howto><em>How to read this:</em> {esc(a['how_to_read'])}</p>")
    if not a["ran"]:
        return "".join(parts) + bullet_list(a["caveats"]) + "</section>"
    for name, m in a["models"].items():
        parts.append(f"<h3>{esc(m['title'])}</h3>")
        sh = m["shadows"]
        parts.append(
            f"<p>{fmt(m['n_members'])} members (training split) and {fmt(m['n_non_members'])} non-members (test "
            f"split). LiRA: {esc(sh['variant'])}, {fmt(sh['n'])} shadow models trained by "
            f"<code>{esc(sh['trained_by'])}</code> for {fmt(sh['epochs'])} epochs on {esc(sh['training_data'])}"
            f"{' with DP' if sh['dp'] else ''}."
            + (
                " The audited model was trained federated but the shadows are trained centrally: they mimic its "
                "architecture and settings, not FedAvg's schedule, a mismatch that can weaken LiRA, so a low score "
                "is weaker evidence here."
                if sh.get("audited_model_training") == "federated"
                else ""
            )
            + _shadows_like_target(sh)
            + f" Positive control: {esc(m['control']['description'])} (its "
            f"training loss {fmt(m['control']['train_loss'], 3)}, test loss {fmt(m['control']['test_loss'], 3)}).</p>"
        )
        control = m["control"]
        who = (
            f"positive control (noise ×{fmt(control.get('noise_factor'), 2)}, recorded ε {fmt(m['claimed_epsilon'], 4)})"
            if control.get("kind") == "noise mutant"
            else "positive control (overfit, no DP)"
        )
        rows = _attack_rows(m["attacks"], "released model", m["claimed_epsilon"])
        rows += _attack_rows(
            control["attacks"], who, m["claimed_epsilon"] if control.get("kind") == "noise mutant" else None
        )
        parts.append(
            table(
                ["model", "attack", "ROC-AUC [95% CI]", "TPR at FPR [95% CI]", "empirical ε lower bound", "claimed ε"],
                rows,
            )
        )
        parts.append(_canary_table(m, who))
        cert = m.get("certifiable_epsilon") or {}
        parts.append(
            f"<p><strong>What this audit can certify:</strong> the membership attacks at most ε = "
            f"{fmt(cert.get('membership_attacks'), 3)} (a perfect attack on these held-out records)"
            + (
                f"; the canary audit at most ε = {fmt(cert['canaries'], 3)} (every guess right)"
                if cert.get("canaries") is not None
                else f"; no canary audit ({esc(m['canaries'].get('why', ''))})"
            )
            + f". <strong>Verdict:</strong> {esc(m['verdict']['statement'])}</p>"
        )
    parts.append("<h3>Audit caveats</h3>" + bullet_list(a["caveats"], "warnlist"))
    return "".join(parts) + "</section>"


def _epsilon_check(chk: Mapping[str, Any] | None, what: str) -> str:
    """The independent ε check of one record (dp-accounting's PLD and RDP beside the recorded ε), or ''."""
    if not chk:
        return ""
    if not chk.get("available"):
        return f"<p class=warn>ε{esc(what)} not independently checked: {esc(chk.get('reason'))}</p>"
    rows = [
        [
            esc(x["who"]),
            fmt(x["recorded_epsilon"]),
            fmt(x["pld_epsilon"]),
            fmt(x["rdp_epsilon"]),
            fmt(x["delta"], 3),
            "agrees" if x["agrees"] else "<strong>DISAGREES</strong>",
        ]
        for x in chk["checks"]
    ]
    source = chk["checks"][0].get("history_source", "recorded")
    how = "the recorded accountant history" if source == "recorded" else f"the steps and sample rate {source}"
    return (
        f"<h4>Independent check of ε{esc(what)} ({esc(chk['checks'][0]['implementation'])}, from {esc(how)}; "
        f"{esc(chk['rule'])})</h4>"
        + table(["history", "recorded ε", "PLD ε", "RDP ε (upper bound)", "δ", "verdict"], rows)
    )


def _privacy(c: Mapping[str, Any]) -> str:
    p = c["privacy"]
    cls = "box" if p["enabled"] else "box warn"
    parts = ["<section id=privacy><h2>Privacy</h2>", f"<div class='{cls}'>{esc(p['statement'])}</div>"]
    if p["enabled"]:
        parts.append(f"<p>Training mode: {esc(p['mode'])}.</p>")
        key_fields = (
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
        for name, rec in p["models"].items():
            if not rec:
                continue
            parts.append(f"<h3>{esc(name)}</h3>")
            main = {k: rec.get(k) for k in key_fields if k in rec}
            rest = {k: v for k, v in rec.items() if k not in key_fields}
            parts.append(kv_table(main))
            parts.append(_epsilon_check((p.get("independent_checks") or {}).get(name), ""))
            if "epsilon_per_client" in rec:
                rows = [[esc(cid), fmt(e)] for cid, e in rec["epsilon_per_client"].items()]
                parts.append("<h4>ε per client</h4>" + table(["client", "ε"], rows))
            if rest:
                parts.append(
                    "<details><summary>Full privacy record (accountant history, per-client details)</summary>"
                    + kv_table(rest)
                    + "</details>"
                )
    students = {k: v for k, v in (p.get("independent_checks") or {}).items() if k not in (p.get("models") or {})}
    for key, chk in students.items():
        parts.append(_epsilon_check(chk, f", {key}'s own DP-SGD before composition"))
    parts.append("<h3>What the guarantee covers</h3>" + bullet_list(p["covered"]))
    parts.append("<h3>What it does not cover</h3>" + bullet_list(p["not_covered"]))
    parts.append("<h3>Privacy caveats</h3>" + bullet_list(p["caveats"], "warnlist"))
    parts.append("</section>")
    return "".join(parts)


def _quality_rows(q: Mapping[str, Any]) -> list[list[str]]:
    """Rows of one model's explanation-quality table: (measure, value, how to read it)."""
    rows = []
    ref = q["reference"]
    if ref is not None:
        rows.append(
            [
                f"{esc(q['primary'])} vs reference ({fmt(ref['n'])} inputs)",
                f"{esc(reference_sentence(ref))}; largest absolute error {fmt(ref['max_abs_error'])}, mean relative "
                f"error {fmt(ref['mean_rel_error'])}, Pearson {fmt(ref['pearson'])}, top-{fmt(ref['k'])} overlap "
                f"{fmt(ref['topk'])}",
                f"reference: {esc(ref['reference_description'])}; 0 error = identical values; the interval is the "
                "order-statistic (binomial) interval of the median over the inputs",
            ]
        )
    if q["additivity_max_abs_error"] is not None:
        rows.append(
            [
                "SHAP additivity |base + Σφ − f(x)|",
                f"max {fmt(q['additivity_max_abs_error'])}, relative {fmt(q['additivity_max_rel_error'])}",
                "0 means the attributions add up to the output (necessary, not sufficient, for exact values)",
            ]
        )
    for label, r in (("model-randomisation", q["randomisation"]), ("random-logit", q["class_randomisation"])):
        if r is None:
            continue
        rows.append(
            [
                f"{label} check ({fmt(r['n'])} inputs)",
                f"signed: {'pass' if r['passed_signed'] else 'FAIL'}, {esc(randomisation_sentence(r, 'signed'))}; "
                f"|attribution|: {'pass' if r['passed_abs'] else 'FAIL'}, {esc(randomisation_sentence(r, 'abs'))}; "
                f"|x − baseline| alone vs |attribution| {fmt(r['input_only_spearman_abs'])}",
                f"{esc(r.get('citation') or 'Adebayo et al. 2018')}; {esc(r['randomisation'])}; {esc(r['rule'])}",
            ]
        )
        for step in r.get("cascade") or []:
            rows.append(
                [
                    f"&nbsp;&nbsp;cascade: {esc(', '.join(step['layers']))} re-initialised",
                    f"|Spearman| trained vs randomised: signed {fmt(step['spearman_signed'])}, |attribution| "
                    f"{fmt(step['spearman_abs'])}; rows above {fmt(r['threshold'])}: "
                    f"{fmt(100 * step['fraction_signed'])}% / {fmt(100 * step['fraction_abs'])}%",
                    "one seed; learned layers re-initialised from the head down (the last step is the full "
                    "randomisation): where the attribution stops changing, the layers below do not shape it",
                ]
            )
    for meth, f in q["faithfulness"].items():
        rows.append(
            [
                f"deletion AUC, {esc(meth)}",
                f"{fmt(f['deletion_auc'])} vs random {fmt(f['random_deletion_auc'])}"
                f" (beats random on {fmt(100 * f['deletion_win_rate'], 3)}% of rows)",
                "lower is better; lower than random is faithful",
            ]
        )
        rows.append(
            [
                f"insertion AUC, {esc(meth)}",
                f"{fmt(f['insertion_auc'])} vs random "
                f"{fmt(f['random_insertion_auc'])} ({fmt(100 * f['insertion_win_rate'], 3)}% of rows)",
                "higher is better; higher than random is faithful",
            ]
        )
    for pair, a in q["agreement"].items():
        pixel = a.get("pixel_level")
        extra = (
            ""
            if not pixel
            else f" (per pixel, top-{fmt(pixel['k'])}: overlap {fmt(pixel['mean_topk'])}, Spearman "
            f"{fmt(pixel['mean_spearman'])}, {fmt(pixel['n_flagged'])} flagged; not like with like)"
        )
        rows.append(
            [
                f"agreement {esc(pair)} (top-{fmt(a['k'])} {esc(a['k_unit'])})",
                f"overlap {fmt(a['mean_topk'])}, Spearman {fmt(a['mean_spearman'])}, sign {fmt(a['mean_sign'])}; "
                f"{fmt(a['n_flagged'])} flagged{extra}",
                f"compared at {esc(a['resolution'])}; "
                + esc(
                    (a.get("flag_rule") or {}).get("rule")
                    or f"rows with top-k overlap below {fmt(a['threshold'])} are flagged"
                ),
            ]
        )
    for meth, st in q["stability"].items():
        rows.append(
            [
                f"{esc(meth)} stability ({fmt(len(st['seeds']))} seeds, {fmt(st['n_rows'])} rows)",
                f"mean top-{fmt(st['k'])} Jaccard {fmt(st['mean'])}, min {fmt(st['min'])}",
                f"1 = the same features every run; compared at {esc(st['resolution'] or 'features')}",
            ]
        )
    for meth, lf in q["lime_fidelity"].items():
        rows.append(
            [
                f"{esc(meth)} local fidelity",
                f"R² mean {fmt(lf['mean_r2'])}, median {fmt(lf['median_r2'])}, min {fmt(lf['min_r2'])}; "
                f"surrogate error at the explained input: mean {fmt(lf['mean_abs_error_at_row'])}, max "
                f"{fmt(lf['max_abs_error_at_row'])}",
                "R² is in-sample on LIME's perturbations (1 = perfect fit); the error at the explained input is in "
                "explained-output units (0 = the surrogate reproduces the model there)",
            ]
        )
    return rows


def _explanations(c: Mapping[str, Any], figs: Mapping[str, bytes]) -> str:
    e = c["explanations"]
    parts = [
        "<section id=explanations><h2>Explanations</h2>",
        f"<p>Backgrounds and reference data: the <strong>{esc(e['background_split'])}</strong> split. Explained "
        f"inputs: test rows. Models were explained on fresh copies of their weights (no Opacus hooks). The explain "
        f"stage took {fmt(e['seconds'])} s (target: {fmt(e['target_seconds'])} s).</p>",
    ]
    for name, m in e["models"].items():
        q = m["quality"]
        parts.append(f"<h3>{esc(m['title'])}</h3>")
        bg = m["background"]
        run = m["methods"].get("run", [m["methods"]["shap"], m["methods"]["lime"]])
        parts.append(
            f"<p>Methods: {', '.join(f'<code>{esc(x)}</code>' for x in run)}; primary SHAP method "
            f"<code>{esc(q['primary'])}</code>: <strong>{esc(q['exactness'])}</strong>. Explained output: "
            f"{esc(m['explained_output'])}. {fmt(m['n_explained'])} "
            f"{esc(m['explained_split'])} inputs explained against {fmt(bg['size'])} background rows of the "
            f"{esc(bg['split'])} split ({fmt(bg['available'])} available; their source-row indices are recorded "
            f"in {esc(bg['index_recorded_in'])}).</p>"
        )
        parts.append(table(["quality measure", "value", "meaning"], _quality_rows(q)))
        if m.get("mean_abs_shap"):
            ranked = sorted(m["mean_abs_shap"].items(), key=lambda kv: -(kv[1] or 0))
            parts.append(
                "<details><summary>Mean |SHAP| per feature (standardised target units: 1 = one standard "
                "deviation of the target)</summary>"
                + table(["feature", "mean |SHAP|"], [[f"<code>{esc(k)}</code>", fmt(v)] for k, v in ranked])
                + "</details>"
            )
        if m.get("dependence"):
            parts.append(
                "<h4>Feature dependence of the top features</h4><p>For each feature with the largest mean |SHAP|: "
                "shap's dependence plot (SHAP value against feature value, coloured by the feature that interacts "
                "most with it) and the partial dependence with ICE curves over the public background rows "
                "(scikit-learn's <code>partial_dependence</code> on the trained network; grid: the feature's distinct "
                "values when it has fewer than 20, so a binary feature has 2 points and is trivially monotone). PDP range: how far the "
                "average prediction moves across the grid (target units). ICE spread: the largest spread of the "
                "row-centred ICE curves at one grid value (0 = the feature acts additively; large = it interacts). "
                "Read the figures below with their notes.</p>"
                + table(
                    [
                        "#",
                        "feature",
                        "mean |SHAP|",
                        "coloured by",
                        "PDP range",
                        "monotone",
                        "ICE spread",
                        "rows",
                        "grid",
                    ],
                    [
                        [
                            fmt(d["rank"] + 1),
                            f"<code>{esc(d['feature'])}</code>",
                            fmt(d["mean_abs_shap"]),
                            f"<code>{esc(d['interaction'] or '—')}</code>",
                            fmt(d["pdp_range"]),
                            "yes" if d["pdp_monotone"] else "no",
                            fmt(d["ice_spread"]),
                            fmt(d["pdp_rows"]),
                            fmt(d["pdp_grid_points"]),
                        ]
                        for d in m["dependence"]
                    ],
                )
            )
        for plot in m["plots"]:
            if plot["kind"] == "misclassified":
                parts.append(
                    f"<p class=small>The misclassified-examples figure ({esc(plot['file'])}) is shown with the "
                    "per-class errors under Models.</p>"
                )
                continue
            parts.append(
                figure(
                    figs.get(plot["file"]),
                    plot["title"],
                    plot["how_to_read"],
                    caption=f"{plot['file']} (SHA-256 {plot['sha256'] or 'n/a'})",
                )
            )
        if m["flagged"]:
            parts.append(
                f"<h4>Flagged disagreements ({fmt(q['n_flagged'])})</h4><p class=small>Rows where two methods "
                "share fewer top features (image cells) than the threshold, at the resolution stated above; "
                "<code>row</code> is the position among the explained inputs, <code>source_index</code> the row "
                "in the source data.</p>" + records_table(m["flagged"], limit=20)
            )
        if m["notes"]:
            parts.append(bullet_list(m["notes"]))
    if e["variants"]:
        parts.append(
            "<h3>Model variants (teacher vs student)</h3><p>How differently the variants attribute the same "
            "inputs: global rank correlation and top-k overlap of mean |attribution|, L1 distance of the "
            "normalised importances (0 = identical, 2 = disjoint), mean per-row agreement. Each model's variants are "
            "explained with the run's primary SHAP method for that model (column methods).</p>"
            + _variants_table(e["variants"])
        )
    parts.append("<h3>Explanation caveats</h3>" + bullet_list(e["caveats"]))
    parts.append("</section>")
    return "".join(parts)


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


def _variants_table(records: list[Mapping[str, Any]]) -> str:
    """The teacher/student comparisons in a fixed set of columns that fit the page (the full records are in
    report.json); cells wrap."""
    rows = [
        [
            esc(", ".join(map(str, r.get(k)))) if isinstance(r.get(k), list) else value_html(r.get(k), 7)
            for k, _ in _VARIANT_COLUMNS
        ]
        for r in records
    ]
    return table([esc(label) for _, label in _VARIANT_COLUMNS], rows).replace("<table>", "<table class=wrap>", 1)


def _distill(c: Mapping[str, Any]) -> str:
    if "distill" not in c:
        return ""
    parts = [
        "<section id=distill><h2>Distillation</h2><p>The distill stage's record of each student, as it wrote it "
        "(teacher-student explanation similarity is summarised under Explanations). The decision-tree student's "
        "rules are in standardised feature units ((value &minus; training mean) / training standard deviation, "
        "see data/*.json preprocessing), and its leaf values in standardised target units.</p>"
    ]
    for model, record in c["distill"].items():
        parts.append(f"<details><summary>{esc(model)}</summary>{value_html(record)}</details>")
    return "".join(parts) + "</section>"


def _reproducibility(c: Mapping[str, Any]) -> str:
    r = c["reproducibility"]
    rows = [
        [
            f"<code>{esc(a['path'])}</code>",
            esc(a.get("stage")),
            esc(a.get("kind")),
            fmt(a.get("bytes")),
            f"<code>{esc(a.get('sha256'))}</code>",
        ]
        for a in r["artifacts"]
    ]
    return (
        "<section id=reproducibility><h2>Reproducibility</h2>"
        + kv_table(
            {
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
        )
        + f"<p class=small>{esc(r['seed_note'])}</p>"
        + f"<h3>Command of this run</h3><pre>{esc(r['command'] or '(not recorded)')}</pre>"
        + f"<h3>Re-run</h3><pre>{esc(chr(10).join(r['rerun_commands']))}</pre>"
        + f"<h3>Artifacts of earlier stages</h3><p class=small>{esc(r['self_hash_note'])}</p>"
        + table(["path", "stage", "kind", "bytes", "SHA-256"], rows)
        + f"<h3>Resolved configuration</h3><pre>{esc(r['config_toml'])}</pre></section>"
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


def _annex_iv(a: Mapping[str, Any] | None) -> str:
    """The EU AI Act Annex IV map: per point, what this run's records cover and where, and what to provide."""
    if not a:
        return ""
    rows = []
    for it in a["items"]:
        where = "; ".join(
            f"<a href='{esc(w.split(' ', 1)[0])}'>{esc(w)}</a>" if w.startswith("#") else esc(w) for w in it["where"]
        )
        status = it["status"] if not it["provide"] else f"{it['status']}: provide {it['provide']}"
        rows.append([esc(it["item"]), esc(it["asks"]), esc(status), where or "—"])
    return (
        f"<section id=annex-iv><h2>EU AI Act Annex IV map</h2><p class=small>{esc(a['source'])}: {esc(a['note'])}.</p>"
        + table(["point", "what it asks (paraphrased)", "this run", "where in this report"], rows).replace(
            "<table>", "<table class=wrap>", 1
        )
        + "</section>"
    )


def render(content: Mapping[str, Any], figs: Mapping[str, bytes]) -> str:
    """The complete HTML page."""
    title = f"{content['title']} {content.get('run_id') or ''}".strip()
    sections = [*SECTIONS[:6], ("distill", "Distillation"), *SECTIONS[6:]] if "distill" in content else SECTIONS
    sections = [s for s in sections if s[0] != "annex-iv" or "annex_iv" in content]
    nav = "".join(f"<li><a href='#{sid}'>{esc(label)}</a></li>" for sid, label in sections)
    body = (
        _summary(content)
        + _data(content)
        + _models(content, figs)
        + _privacy(content)
        + _audit(content)
        + _explanations(content, figs)
        + _distill(content)
        + _annex_iv(content.get("annex_iv"))
        + _reproducibility(content)
    )
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv=Content-Security-Policy content="{CSP}">'
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p class=small>Run created {esc(content.get('created') or '—')}; report built "
        f"from stages recorded up to {esc(content['generated'])}. Machine-readable twin: "
        f"<code>{esc(content['files']['json'])}</code>.<br>Manifest SHA-256 (of <code>report_provenance.json</code>, "
        f"the manifest as this report read it): <code>{esc(content.get('manifest_sha256') or '—')}</code></p></header>"
        f"<nav><ol>{nav}</ol></nav>{body}</body></html>\n"
    )
