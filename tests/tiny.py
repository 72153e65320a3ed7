"""Configuration overrides small enough for end-to-end tests: a few epochs, tiny models, short explanations."""

TRAIN = [
    "regressor.hidden_sizes=[8]",
    "regressor.fit.epochs=3",
    "regressor.dp_fit.epochs=2",
    "cnn.channels=[4]",
    "cnn.hidden=8",
    "cnn.fit.epochs=2",
    "cnn.dp_fit.epochs=2",
    "dp.public_pretrain_epochs=2",
    "report.pdf=false",  # ~6 s of CPU per report; tests/pipeline/test_report_pdf.py prints and checks report.pdf
]
EXPLAIN = [
    "explain.n_rows=10",
    "explain.n_images=4",
    "explain.lime_num_samples=100",
    "explain.lime_image_num_samples=60",
    "explain.stability_rows=3",
    "explain.deletion_steps=4",
    "explain.n_waterfalls=1",
    "explain.n_grid_images=2",
    "explain.background_size=20",
    "explain.reference_rows=2",
    "explain.reference_images=1",
    "explain.reference_nsamples=200",
    "explain.randomisation_rows=3",
    "explain.n_dependence_plots=1",  # figures are most of a tiny run's explain stage (3 + 3 PDPs: ~0.8 s)
    "explain.n_error_examples=1",
]
DISTILL = [
    "distill.fit.epochs=2",
    "distill.synthetic_per_row=2",
    "distill.augment_per_row=2",
    "distill.mixup_per_row=1",
    "distill.augmented_epochs=2",
    "distill.cnn_channels=[2]",
    "distill.regressor_hidden=[2]",
]
AUDIT = [
    "audit.n_eval=40",
    "audit.n_shadows=2",
    "audit.shadow_epochs=2",
    "audit.control_rows=8",
    "audit.control_epochs=5",
    "audit.bootstrap=100",
]
ALL = TRAIN + EXPLAIN + DISTILL + AUDIT
