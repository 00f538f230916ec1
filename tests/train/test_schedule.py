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


def test_a_plan_slot_continues_the_plan_wide_curve():
    from stackrec_dist.train.schedule import ScheduleSlot

    cfg = OptimConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    whole = lr_lambda(cfg, total_steps=110)
    first = lr_lambda(cfg, total_steps=40, slot=ScheduleSlot(start=0, total=110))
    grown = lr_lambda(cfg, total_steps=70, slot=ScheduleSlot(start=40, total=110))
    assert [first(s) for s in range(40)] == pytest.approx([whole(s) for s in range(40)])
    assert [grown(s) for s in range(70)] == pytest.approx([whole(40 + s) for s in range(70)])
    assert grown(69) == pytest.approx(whole(109)) and grown(0) < 1.0  # no jump back to the peak


def test_a_grown_stage_ramps_onto_the_plan_curve():
    from stackrec_dist.train.schedule import ScheduleSlot

    cfg = OptimConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    whole = lr_lambda(cfg, total_steps=110)
    grown = lr_lambda(cfg, total_steps=70, slot=ScheduleSlot(start=40, total=110, ramp=4))
    assert grown(0) == pytest.approx(whole(40) * 0.25)
    assert grown(3) == pytest.approx(whole(43))
    assert grown(10) == pytest.approx(whole(50))
