"""``lime-image``: lime's LimeImageExplainer on a fixed pixel grid.

lime's default quickshift segmentation finds one segment on an 8x8 digit, so
the default here is a grid of square cells (``cell_size`` pixels; default
``min(H, W) // 4``: 2x2 cells on 8x8, 4x4 on 16x16, 7x7 on 28x28, i.e. 16
segments). ``segmentation="slic"`` or any callable ``(H, W, C) -> (H, W)`` int
labels can be used instead.

A segment that is switched off takes the ``hide`` value (default: the
per-pixel background mean, the same baseline the deletion metric uses). lime
only accepts a scalar hide colour, so the image is shifted by the baseline,
hidden with 0, and the classifier adds the baseline back.

The surrogate is fitted to the explained class's **logit** (as SHAP explains).
A segment's weight is spread evenly over its pixels and channels, so
``values`` has shape ``(n, C, H, W)`` and sums, per image, to the sum of segment
weights; ``base_values`` is the intercept (surrogate output with every segment
hidden), ``extras["score"]`` the surrogate's R^2 per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from explain._checks import check_positive_int, row_seed
from explain._lime import SurrogateFits
from explain._model import Prepared, prepare
from explain.types import Explanation

NAME = "lime-image"
Segmenter = Callable[[np.ndarray], np.ndarray]


def grid_segments(height: int, width: int, *, cell_size: int) -> np.ndarray:
    """Label map ``(height, width)`` of square cells, numbered row-major from 0."""
    cell_size = check_positive_int("cell_size", cell_size)
    if cell_size > min(height, width):
        raise ValueError(f"cell_size={cell_size} exceeds the image side {min(height, width)}; use a smaller cell.")
    n_cols = -(-width // cell_size)
    rows = np.arange(height)[:, None] // cell_size
    cols = np.arange(width)[None, :] // cell_size
    return (rows * n_cols + cols).astype(np.int64)


def _segmenter(segmentation: str | Segmenter, *, cell_size: int | None, n_segments: int) -> Segmenter:
    if callable(segmentation):
        return segmentation
    if segmentation == "grid":

        def grid(image: np.ndarray) -> np.ndarray:
            h, w = image.shape[:2]
            return grid_segments(h, w, cell_size=cell_size or max(1, min(h, w) // 4))

        return grid
    if segmentation == "slic":
        from skimage.segmentation import slic

        def slic_fn(image: np.ndarray) -> np.ndarray:
            img = image[..., 0] if image.shape[-1] == 1 else image
            return slic(
                img, n_segments=n_segments, compactness=0.1, start_label=0, channel_axis=None if img.ndim == 2 else -1
            )

        return slic_fn
    raise ValueError(
        f"segmentation={segmentation!r} is not valid; use 'grid', 'slic' or a callable (H, W, C) -> (H, W)."
    )


def _hidden_value(hide: str | float, background: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """What a hidden cell shows, as an (H, W, C) float64 image: the background mean, zeros or a constant."""
    if isinstance(hide, str):
        if hide not in ("mean", "zero"):
            raise ValueError(f"hide={hide!r} is not valid; use 'mean', 'zero' or a float.")
        baseline = background.mean(axis=0) if hide == "mean" else np.zeros(shape, np.float32)
    else:
        baseline = np.full(shape, float(hide), np.float32)
    return np.transpose(baseline, (1, 2, 0)).astype(np.float64)


def _pixel_values(cell_weights, seg: np.ndarray, n_channels: int) -> np.ndarray:
    """LIME's per-cell weights spread evenly over the cell's pixels and channels: (C, H, W), summing to the weights."""
    weights = np.zeros(int(seg.max()) + 1)
    for s, w in cell_weights:
        weights[s] = w
    pixel = weights[seg] / (np.bincount(seg.ravel())[seg] * n_channels)  # (H, W)
    return np.broadcast_to(pixel, (n_channels, *seg.shape))


def _lime_explainer_class() -> type:
    from lime.lime_image import LimeImageExplainer

    class _QuietLimeImageExplainer(LimeImageExplainer):
        """LimeImageExplainer whose sampling is vectorised and has no progress bar.

        Draws the same random masks, in the same order, as lime 0.2.0.1's
        ``data_labels`` (which loops in Python behind a tqdm bar).
        """

        def data_labels(self, image, fudged_image, segments, classifier_fn, num_samples, batch_size=10):
            n_features = np.unique(segments).shape[0]
            data = self.random_state.randint(0, 2, num_samples * n_features).reshape((num_samples, n_features))
            data[0, :] = 1
            on = data[:, segments].astype(bool)[..., None]  # (S, H, W, 1)
            imgs = np.where(on, image[None], fudged_image[None])  # (S, H, W, C)
            return data, np.asarray(classifier_fn(imgs))

    return _QuietLimeImageExplainer


def explain(
    model: nn.Module,
    x: np.ndarray,
    *,
    background: np.ndarray,
    task: str,
    seed: int,
    feature_names: Sequence[str] | None = None,
    targets: np.ndarray | None = None,
    num_samples: int = 500,
    segmentation: str | Segmenter = "grid",
    cell_size: int | None = None,
    n_segments: int = 16,
    hide: str | float = "mean",
    kernel_width: float = 0.25,
) -> Explanation:
    """Explain an image classifier with LIME.

    Parameters
    ----------
    model, x, background, task, seed, targets
        As for :func:`explain.shap_deep.explain`; ``x`` must be ``(n, C, H, W)``
        and ``task`` must be ``"classification"``.
    feature_names : None
        Not used for images; must be None.
    num_samples : int
        Perturbed images per explained image.
    segmentation : {"grid", "slic"} or callable
        How pixels are grouped into LIME's features.
    cell_size : int, optional
        Grid cell side in pixels (default ``min(H, W) // 4``).
    n_segments : int
        Target number of segments for ``"slic"``.
    hide : {"mean", "zero"} or float
        Value of hidden pixels: per-pixel background mean, 0, or a constant.
    kernel_width : float
        lime's proximity kernel width on cosine distance (its default 0.25).

    Returns
    -------
    Explanation
        See the module docstring. ``extras["segments"]`` holds each image's
        label map ``(n, H, W)`` (summarised in ``to_dict``).

    Raises
    ------
    ValueError
        On invalid inputs, non-image inputs or ``task="regression"``.
    """
    if task == "regression":
        raise ValueError("lime-image explains classifiers; use task='classification' (or lime-tabular for regression).")
    p = prepare(
        model,
        x,
        background=background,
        task=task,
        seed=seed,
        feature_names=feature_names,
        targets=targets,
        ndims=(4,),
        method=NAME,
    )
    num_samples = check_positive_int("num_samples", num_samples, minimum=10)
    segment = _segmenter(segmentation, cell_size=cell_size, n_segments=n_segments)
    baseline_hwc = _hidden_value(hide, p.background, p.x.shape[1:])  # (H, W, C)
    values, all_segments, fits = _explain_images(
        p, segment, baseline_hwc, num_samples=num_samples, kernel_width=kernel_width
    )
    return p.explanation(  # images: p.feature_names is None
        NAME,
        values,
        fits.intercept,
        num_samples=num_samples,
        **_segmentation_extras(segmentation, all_segments, hide=hide),
        **fits.extras(),
        output=p.output_kind,
    )


def _segmentation_extras(
    segmentation: str | Segmenter, all_segments: np.ndarray, *, hide: str | float
) -> dict[str, Any]:
    """How the images were cut and hidden: the segmentation's name, segments per image, the label maps, ``hide``."""
    return {
        "segmentation": segmentation
        if isinstance(segmentation, str)
        else getattr(segmentation, "__name__", "callable"),
        "n_segments": [int(s.max()) + 1 for s in all_segments],
        "segments": all_segments,
        "hide": hide,
    }


def _shifted_classifier(
    predict: Callable[[np.ndarray], np.ndarray], baseline_hwc: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    """The model on lime's images: lime works on baseline-shifted (S, H, W, C) images; undo both for the model."""

    def classifier_fn(images_hwc: np.ndarray) -> np.ndarray:
        chw = np.transpose(images_hwc + baseline_hwc, (0, 3, 1, 2))  # (S, C, H, W)
        return predict(chw)

    return classifier_fn


def _label_map(segment: Segmenter, image_hwc: np.ndarray) -> np.ndarray:
    """``segment``'s labels for one (H, W, C) image, renumbered 0..S-1 (lime assumes contiguous labels)."""
    _, seg = np.unique(np.asarray(segment(image_hwc)), return_inverse=True)
    return seg.reshape(image_hwc.shape[:2])


def _explain_images(
    p: Prepared, segment: Segmenter, baseline_hwc: np.ndarray, *, num_samples: int, kernel_width: float
) -> tuple[np.ndarray, np.ndarray, SurrogateFits]:
    """LIME at every image, each with its own explainer seeded from ``(seed, image)``.

    Returns the pixel values ``(n, C, H, W)``, each image's label map ``(n, H, W)`` and the surrogates' fits.
    """
    classifier_fn = _shifted_classifier(p.predict, baseline_hwc)
    explainer_cls = _lime_explainer_class()
    n, n_channels, height, width = p.x.shape
    values = np.zeros(p.x.shape)
    fits = SurrogateFits(n)
    all_segments = np.zeros((n, height, width), dtype=np.int64)
    for i in range(n):
        image_hwc = np.transpose(p.x[i], (1, 2, 0)).astype(np.float64)
        # Segment the original image, not the shifted one.
        seg = _label_map(segment, image_hwc)
        rs = row_seed(p.seed, i)
        explainer = explainer_cls(kernel_width=kernel_width, feature_selection="none", random_state=rs)
        target = int(p.targets[i])
        exp = explainer.explain_instance(
            image_hwc - baseline_hwc,
            classifier_fn,
            labels=(target,),
            hide_color=0.0,
            top_labels=None,
            num_features=int(seg.max()) + 1,
            num_samples=num_samples,
            segmentation_fn=lambda _img, s=seg: s,
            random_seed=rs,
        )
        values[i] = _pixel_values(exp.local_exp[target], seg, n_channels)
        fits.record(i, exp, label=target)
        all_segments[i] = seg
    return values, all_segments, fits
