import pytest
import torch

from auditml_core import models


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 16, 16), (1, 28, 28), (3, 28, 28), (3, 8, 8), (1, 5, 7)])
def test_cnn_adapts_to_input_shape(shape):
    model = models.build_cnn(input_shape=shape, n_classes=4, channels=(4, 8), hidden=16)
    assert model(torch.zeros(2, *shape)).shape == (2, 4)


def test_models_are_valid_for_opacus_and_use_only_known_modules():
    from opacus.validators import ModuleValidator

    for model in (
        models.build_cnn(input_shape=(1, 8, 8), n_classes=10),
        models.build_regressor(n_features=10, hidden_sizes=(8,)),
    ):
        assert ModuleValidator.validate(model, strict=False) == []
        kinds = {type(m) for m in model.modules()} - {torch.nn.Sequential}
        assert kinds <= {
            torch.nn.Conv2d,
            torch.nn.ReLU,
            torch.nn.Tanh,
            torch.nn.MaxPool2d,
            torch.nn.Flatten,
            torch.nn.Linear,
        }


def test_build_from_spec_and_errors():
    spec = {"kind": "regressor", "kwargs": {"n_features": 3, "hidden_sizes": [4], "activation": "tanh"}}
    model = models.build(spec)
    assert model(torch.zeros(5, 3)).shape == (5, 1)
    assert models.n_parameters(model) == 3 * 4 + 4 + 4 + 1
    with pytest.raises(ValueError, match="choose one of: regressor, cnn"):
        models.build({"kind": "svm", "kwargs": {}})
    with pytest.raises(ValueError, match="choose one of: relu, tanh"):
        models.build_regressor(n_features=3, hidden_sizes=(2,), activation="gelu")
    with pytest.raises(ValueError, match="at least two classes"):
        models.build_cnn(input_shape=(1, 8, 8), n_classes=1)


def test_scatter_model_fixed_front_end_opacus_and_shap():
    import numpy as np
    import shap
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    model = models.build_scatter(input_shape=(1, 8, 8), n_classes=10, norm_groups=6)
    assert ModuleValidator.validate(model, strict=False) == []
    conv = model[0]
    assert isinstance(conv, torch.nn.Conv2d) and not conv.weight.requires_grad
    # only the head trains: every trainable parameter lies behind the fixed front-end
    assert models.n_parameters(model) == sum(p.numel() for p in model[-1].parameters())
    assert models.n_parameters(model, trainable_only=False) == models.n_parameters(model) + conv.weight.numel()
    # data-independent: two builds under different seeds carry the same filters, unit-norm and zero-mean
    torch.manual_seed(1)
    again = models.build_scatter(input_shape=(1, 8, 8), n_classes=10, norm_groups=6)
    assert torch.equal(again[0].weight, conv.weight)
    bank = models.gabor_bank(kernel_size=5, orientations=8, wavelengths=(3.0, 6.0))
    assert bank.shape == (32, 1, 5, 5)
    assert torch.allclose(bank.flatten(1).norm(dim=1), torch.ones(32), atol=1e-5)
    # spec round trip and the training record's statement
    spec = {"kind": "scatter", "kwargs": {"input_shape": [1, 8, 8], "n_classes": 10, "wavelengths": [3.0, 6.0]}}
    assert models.build(spec)(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    record = models.front_end_record(spec)
    assert record["data_independent"] and record["fixed_parameters"] == 66 * 25
    assert models.front_end_record({"kind": "cnn", "kwargs": {}}) is None
    # shap's gradient explainer: one attribution map per class, the input's shape, finite
    x = torch.randn(6, 1, 8, 8)
    values = shap.GradientExplainer(model.eval(), x[:4]).shap_values(x[4:], nsamples=20, rseed=0)
    values = np.asarray(values)
    assert values.shape in ((2, 1, 8, 8, 10), (10, 2, 1, 8, 8))
    assert np.isfinite(values).all() and np.abs(values).sum() > 0


def test_scatter_model_trains_under_opacus_and_front_end_stays_fixed():
    import numpy as np

    from auditml_core import training
    from auditml_core.config import DPConfig, FitConfig

    torch.manual_seed(0)
    model = models.build_scatter(input_shape=(1, 8, 8), n_classes=3, orientations=2, wavelengths=(3.0,), norm_groups=2)
    before = model[0].weight.detach().clone()
    head_before = model[-1].weight.detach().clone()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 64)
    result = training.fit(
        model,
        x_train=x,
        y_train=y,
        x_val=None,
        y_val=None,
        task="classification",
        fit_cfg=FitConfig(epochs=2, batch_size=16, lr=1e-2),
        dp=DPConfig(enabled=True, target_epsilon=50.0, noise_multiplier=1.0),
        device=torch.device("cpu"),
        seed=0,
    )
    assert torch.equal(result.state_dict["0.weight"], before)
    head_key = f"{len(model) - 1}.weight"
    assert not torch.allclose(result.state_dict[head_key], head_before)  # the head did train
    assert result.privacy["epsilon"] > 0
