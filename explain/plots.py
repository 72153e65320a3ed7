"""Figures as PNG bytes. No files are written and no global style is set.

Our own figures are drawn on ``matplotlib.figure.Figure`` objects with an Agg
canvas, which bypasses pyplot and the global backend. shap's plots draw on
pyplot's current figure, so for those a fresh pyplot figure is opened, saved
and closed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from explain._checks import check_positive_int
from explain._model import scoped_numpy_seed
from explain.dependence import PartialDependenceResult
from explain.quality import DeletionInsertionResult
from explain.types import Explanation

__all__ = [
    "beeswarm_png",
    "waterfall_png",
    "importance_bar_png",
    "image_grid_png",
    "attribution_rows_png",
    "deletion_insertion_png",
    "dependence_png",
    "pdp_ice_png",
    "misclassified_grid_png",
]


INPUT_ALPHA = 0.5  # the grey input under an attribution map: visible where the (transparent-at-0) map is faint


# One colour meaning across the report's figures: red raises the explained output, blue lowers it (waterfall, image
# maps). A feature's value is drawn in viridis (beeswarm, dependence colour), unsigned importance in greys.
VALUE_CMAP = "viridis"
METHOD_GREYS = ("#3d3d3d", "#9e9e9e", "#cfcfcf")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _require_tabular(expl: Explanation, what: str) -> None:
    if expl.is_image:
        raise ValueError(
            f"{what} needs a tabular explanation; got feature shape {expl.feature_shape}. Use image_grid_png."
        )


def _to_shap(expl: Explanation):  # -> shap.Explanation
    import shap

    base = expl.base_values if expl.base_values is not None else np.zeros(expl.n)
    return shap.Explanation(values=expl.values, base_values=base, data=expl.inputs, feature_names=list(expl.names()))


def _shap_png(draw) -> bytes:
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    plt.figure()
    try:
        draw()
        fig = plt.gcf()  # shap may resize the current figure or open a new one (scatter does)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()
    finally:
        for num in set(plt.get_fignums()) - before:  # every figure opened here, and only those
            plt.close(num)


def beeswarm_png(expl: Explanation, *, max_display: int = 10) -> bytes:
    """shap beeswarm of a tabular explanation: one dot per row and feature.

    Raises
    ------
    ValueError
        For image explanations.
    """
    import shap

    _require_tabular(expl, "beeswarm_png")
    max_display = check_positive_int("max_display", max_display)
    # shap's beeswarm jitters dots with numpy's global RNG: a fixed seed makes the figure (and its hash) reproducible.
    with scoped_numpy_seed(0):
        # colour = the feature's value in viridis: red and blue mean an attribution's sign in every other figure
        return _shap_png(
            lambda: shap.plots.beeswarm(_to_shap(expl), max_display=max_display, show=False, color=VALUE_CMAP)
        )


def waterfall_png(expl: Explanation, *, row: int = 0, max_display: int = 10) -> bytes:
    """shap waterfall of one row: base value, contributions, output.

    Raises
    ------
    ValueError
        For image explanations, explanations without base values, or a bad row.
    """
    import shap

    _require_tabular(expl, "waterfall_png")
    if expl.base_values is None:
        raise ValueError(f"{expl.method} has no base values; a waterfall needs them (use a shap-* explanation).")
    if not 0 <= row < expl.n:
        raise ValueError(f"row={row} is out of range; pass 0 <= row < {expl.n}.")
    max_display = check_positive_int("max_display", max_display)
    return _shap_png(lambda: shap.plots.waterfall(_to_shap(expl)[row], max_display=max_display, show=False))


def importance_bar_png(expls: Explanation | Sequence[Explanation], *, max_display: int = 10) -> bytes:
    """Horizontal bars of mean |attribution| per feature, one bar group per explanation.

    Features are ordered by the first explanation's importance; several
    explanations of the same features (e.g. SHAP vs LIME, teacher vs student)
    are drawn side by side.
    """
    expls = [expls] if isinstance(expls, Explanation) else list(expls)
    if not expls:
        raise ValueError("expls is empty; pass at least one Explanation.")
    for e in expls:
        _require_tabular(e, "importance_bar_png")
        if e.feature_shape != expls[0].feature_shape:
            raise ValueError(
                f"explanations cover {e.feature_shape} vs {expls[0].feature_shape} features; pass matching ones."
            )
    max_display = check_positive_int("max_display", max_display)
    order = np.argsort(-expls[0].mean_abs(), kind="stable")[:max_display][::-1]
    names = np.asarray(expls[0].names())[order]
    fig = Figure(figsize=(6, 0.35 * len(order) + 1.2))
    ax = fig.add_subplot()
    height = 0.8 / len(expls)
    for j, e in enumerate(expls):
        shade = METHOD_GREYS[j % len(METHOD_GREYS)]  # unsigned importance: grey, never the signs' red/blue
        ax.barh(np.arange(len(order)) + j * height, e.mean_abs()[order], height=height, label=e.method, color=shade)
    ax.set_yticks(np.arange(len(order)) + 0.4 - height / 2, labels=names)
    ax.set_xlabel("mean |attribution|")
    if len(expls) > 1:
        ax.legend(loc="lower right")
    return _png(fig)


def image_grid_png(expls: Sequence[Explanation], *, n_images: int = 4) -> bytes:
    """Grid: one row per image; the input, then one heatmap per explanation.

    Heatmaps show the attribution summed over channels, in a diverging map
    centred at 0 (red: toward the explained class). Titles give class and logit.
    """
    expls = list(expls)
    if not expls or not all(e.is_image for e in expls):
        raise ValueError("image_grid_png needs one or more image explanations (values of shape (n, C, H, W)).")
    for e in expls[1:]:
        if e.values.shape != expls[0].values.shape:
            raise ValueError(
                f"{e.method} has shape {e.values.shape} but {expls[0].method} has {expls[0].values.shape}; "
                "explain the same images with both."
            )
    n = min(check_positive_int("n_images", n_images), expls[0].n)
    cols = 1 + len(expls)
    fig = Figure(figsize=(1.8 * cols, 1.8 * n + 0.3))
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        img = np.transpose(expls[0].inputs[i], (1, 2, 0))
        img = (img - img.min()) / max(np.ptp(img), 1e-12)  # display scaling only
        axes[i, 0].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        t = "" if expls[0].targets is None else f"class {expls[0].targets[i]}"
        axes[i, 0].set_title(f"input {t}", fontsize=8)
        for j, e in enumerate(expls, start=1):
            heat = e.values[i].sum(axis=0)
            lim = max(float(np.abs(heat).max()), 1e-12)
            axes[i, j].imshow(heat, cmap="bwr", vmin=-lim, vmax=lim)
            axes[i, j].set_title(f"{e.method}\nlogit {e.outputs[i]:.2f}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(fig)


def attribution_rows_png(
    expls: Sequence[Explanation],
    *,
    rows: Sequence[int],
    baseline: np.ndarray,
    true_labels: np.ndarray | None = None,
    row_notes: Sequence[str] | None = None,
) -> bytes:
    """Image attributions the way shap's ``image_plot`` shows them, with the baseline beside them.

    One row per chosen image: the input (true and predicted label), the
    baseline the attributions are measured from (the mean background image),
    then each explanation summed over channels, drawn with shap's conventions:
    the input in grey underneath and the attribution in shap's
    ``red_transparent_blue`` diverging map on top (red raises the explained
    logit, blue lowers it, 0 is transparent, so the input stays visible where
    the attribution is small). Every row has ONE symmetric colour scale shared
    by its attribution panels, with its own labelled colour bar. Drawn here
    rather than with ``shap.image_plot`` because that plot has one scale for the
    whole figure, no baseline panel and no way to show two methods of different
    resolution side by side.

    Parameters
    ----------
    expls : explanations of the same images (e.g. SHAP and LIME).
    rows : indices of the images to show, in order.
    baseline : ``(C, H, W)`` reference image.
    true_labels : ``(n,)`` true classes, optional.
    row_notes : one short note per shown row (why it is shown), optional.

    Raises
    ------
    ValueError
        If the explanations are not image explanations of the same shape, or a row is out of range.
    """
    expls = list(expls)
    if not expls or not all(e.is_image for e in expls):
        raise ValueError("attribution_rows_png needs image explanations (values of shape (n, C, H, W)).")
    rows = [int(r) for r in rows]
    if not rows or min(rows) < 0 or max(rows) >= expls[0].n:
        raise ValueError(f"rows={rows} must be non-empty indices in [0, {expls[0].n - 1}].")
    from shap.plots.colors import red_transparent_blue  # shap's image_plot map: 0 is transparent

    cols = 2 + len(expls)
    fig = Figure(figsize=(1.9 * cols + 0.6, 2.0 * len(rows) + 0.2), layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)

    def gray(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.float64).mean(axis=0)  # (H, W)

    base_img = gray(baseline)
    for r, i in enumerate(rows):
        img = gray(expls[0].inputs[i])
        lo, hi = min(img.min(), base_img.min()), max(img.max(), base_img.max(), img.min() + 1e-12)
        truth = "" if true_labels is None else f"true {int(true_labels[i])}, "
        pred = "" if expls[0].targets is None else f"pred {int(expls[0].targets[i])}"
        note = "" if row_notes is None else f"\n{row_notes[r]}"
        axes[r, 0].imshow(img, cmap="gray_r", vmin=lo, vmax=hi)
        axes[r, 0].set_title(f"#{i}: {truth}{pred}{note}", fontsize=7)
        axes[r, 1].imshow(base_img, cmap="gray_r", vmin=lo, vmax=hi)
        axes[r, 1].set_title("baseline (mean background)", fontsize=7)
        heats = [e.values[i].sum(axis=0) for e in expls]
        lim = max(max(float(np.abs(h).max()) for h in heats), 1e-12)
        im = None
        for j, (e, heat) in enumerate(zip(expls, heats), start=2):
            axes[r, j].imshow(img, cmap="gray_r", vmin=lo, vmax=hi, alpha=INPUT_ALPHA)
            im = axes[r, j].imshow(heat, cmap=red_transparent_blue, vmin=-lim, vmax=lim)
            axes[r, j].set_title(f"{e.method}, logit {e.outputs[i]:.2f}", fontsize=7)
        bar = fig.colorbar(im, ax=list(axes[r, 2:]), shrink=0.9, aspect=12)
        bar.ax.tick_params(labelsize=6)
        bar.set_label("attribution (logit)", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(fig)


def deletion_insertion_png(results: DeletionInsertionResult | Sequence[DeletionInsertionResult]) -> bytes:
    """Mean deletion and insertion curves, each beside its random-order reference."""
    results = [results] if isinstance(results, DeletionInsertionResult) else list(results)
    if not results:
        raise ValueError("results is empty; pass at least one DeletionInsertionResult.")
    fig = Figure(figsize=(9, 3.5))
    ax_del, ax_ins = fig.subplots(1, 2)
    for r in results:
        line = ax_del.plot(r.fractions, r.deletion_curve, label=f"{r.method} (AUC {r.deletion_auc:.3g})")[0]
        ax_del.plot(r.fractions, r.random_deletion_curve, ls="--", color=line.get_color(), alpha=0.6)
        line = ax_ins.plot(r.fractions, r.insertion_curve, label=f"{r.method} (AUC {r.insertion_auc:.3g})")[0]
        ax_ins.plot(r.fractions, r.random_insertion_curve, ls="--", color=line.get_color(), alpha=0.6)
    for ax, title in ((ax_del, "deletion (lower is better)"), (ax_ins, "insertion (higher is better)")):
        ax.set_title(title + "; dashed: random order", fontsize=10)
        ax.set_xlabel("fraction of features")
        ax.set_ylabel("explained output")
        ax.legend(fontsize=9)
    return _png(fig)


def dependence_png(expl: Explanation, *, feature: int, interaction: int | None = None) -> bytes:
    """shap's dependence plot (``shap.plots.scatter``) of one feature, coloured by ``interaction``.

    x: the feature's value; y: its SHAP value for each explained row; colour: the value of the
    ``interaction`` feature (see :func:`explain.dependence.strongest_interaction`), none if None.

    Raises
    ------
    ValueError
        For image explanations or a feature out of range.
    """
    import shap

    _require_tabular(expl, "dependence_png")
    n_features = expl.values.shape[1]
    for name, f in (("feature", feature), ("interaction", interaction)):
        if f is not None and not 0 <= f < n_features:
            raise ValueError(f"{name}={f} is out of range; pass 0 <= {name} < {n_features}.")
    sx = _to_shap(expl)
    color = sx[:, interaction] if interaction is not None else "#555555"
    with scoped_numpy_seed(0):  # shap's scatter jitters and subsamples with numpy's global RNG
        return _shap_png(lambda: shap.plots.scatter(sx[:, feature], color=color, cmap=VALUE_CMAP, show=False))


def pdp_ice_png(result: PartialDependenceResult, *, feature_name: str, output_label: str, max_ice: int = 50) -> bytes:
    """Partial dependence (thick line) over individual conditional expectation curves (thin lines).

    Parameters
    ----------
    result : :func:`explain.dependence.partial_dependence` of one feature.
    feature_name, output_label : axis labels.
    max_ice : at most this many ICE curves are drawn (the first rows), to keep the figure legible.
    """
    max_ice = check_positive_int("max_ice", max_ice)
    fig = Figure(figsize=(4.6, 3.4))
    ax = fig.add_subplot()
    ice = result.individual[:max_ice]
    for curve in ice:
        ax.plot(result.grid, curve, color="#9e9e9e", alpha=0.45, lw=0.8)
    ax.plot(result.grid, result.average, color="#1b1b1b", lw=2.4, label="partial dependence (mean)")
    ax.plot([], [], color="#9e9e9e", lw=0.8, label=f"ICE: {len(ice)} of {len(result.individual)} rows")
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.tick_params(labelsize=9)
    ax.set_xlabel(feature_name)
    ax.set_ylabel(output_label)
    ax.set_title(f"PDP and ICE: {feature_name}", fontsize=10)
    ax.legend(fontsize=9)
    return _png(fig)


def misclassified_grid_png(
    images: np.ndarray,
    true_labels: np.ndarray,
    predicted: np.ndarray,
    *,
    class_names: Sequence[str],
    per_class: int = 4,
) -> bytes:
    """One row per true class with errors: up to ``per_class`` misclassified images, each titled "true → predicted".

    Classes without errors get no row; the title names them and counts all errors.

    Parameters
    ----------
    images : ``(n, C, H, W)`` inputs.
    true_labels, predicted : ``(n,)`` class indices.
    class_names : one name per class index.
    per_class : images shown per class (the first misclassified ones in input order).

    Raises
    ------
    ValueError
        If the arrays disagree in length or are not images.
    """
    images = np.asarray(images)
    true_labels, predicted = np.asarray(true_labels).astype(int), np.asarray(predicted).astype(int)
    if images.ndim != 4 or not len(images) == len(true_labels) == len(predicted):
        raise ValueError(
            f"need (n, C, H, W) images and (n,) labels of the same n; got {images.shape}, {true_labels.shape}, "
            f"{predicted.shape}."
        )
    per_class = check_positive_int("per_class", per_class)
    wrong_by_class = {c: np.flatnonzero((true_labels == c) & (predicted != c)) for c in range(len(class_names))}
    shown = [c for c, w in wrong_by_class.items() if len(w)]  # rows only for classes with errors
    clean = [str(class_names[c]) for c, w in wrong_by_class.items() if not len(w)]
    fig = Figure(figsize=(1.2 * (per_class + 1), 1.15 * max(len(shown), 1) + 0.5), layout="constrained")
    fig.suptitle(
        f"{sum(len(w) for w in wrong_by_class.values())} of {len(true_labels)} misclassified"
        + (f"; no errors in class {', '.join(clean)}" if clean else ""),
        fontsize=8,
    )
    axes = fig.subplots(max(len(shown), 1), per_class + 1, squeeze=False)
    for r, c in enumerate(shown):
        wrong = wrong_by_class[c]
        axes[r, 0].text(0.5, 0.5, f"true {class_names[c]}\n{len(wrong)} wrong", ha="center", va="center", fontsize=8)
        for j, i in enumerate(wrong[:per_class]):
            ax = axes[r, j + 1]
            ax.imshow(np.asarray(images[i], dtype=np.float64).mean(axis=0), cmap="gray_r")
            ax.set_title(f"{class_names[c]} → {class_names[predicted[i]]}", fontsize=7)
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    return _png(fig)
