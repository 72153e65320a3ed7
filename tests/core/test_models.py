import pytest
import torch

from core import models


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
