import pytest

from stackrec_dist.config import OptimConfig
from stackrec_dist.train.schedule import lr_lambda


def test_warmup_then_cosine_to_floor():
    f = lr_lambda(OptimConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1), total_steps=110)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = lr_lambda(OptimConfig(warmup_steps=0, decay="linear", min_lr_ratio=0.0), total_steps=100)
    assert lin(50) == pytest.approx(0.5)
    const = lr_lambda(OptimConfig(warmup_steps=5, decay="constant"), total_steps=100)
    assert const(2) == pytest.approx(0.6) and const(99) == 1.0


def test_warmup_longer_than_run_is_clamped():
    f = lr_lambda(OptimConfig(warmup_steps=1000), total_steps=10)
    assert f(8) == pytest.approx(1.0)
