import dataclasses

import pytest
import torch

from stackrec_dist.config import GrowthConfig, ModelConfig
from stackrec_dist.growth.grow import grow_model
from stackrec_dist.growth.stacking import (
    StackingError,
    check_matches,
    source_block,
    stack_state_dict,
    stacking_plan,
)
from stackrec_dist.models import build_model

BACKBONES = ["nextitnet", "sasrec"]


def _trained_like(backbone: str, blocks: int = 4) -> torch.nn.Module:
    """A model whose parameters all differ (alphas non-zero), as after training."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, num_items=40, dim=16, num_blocks=blocks, max_len=10)).double()
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.alpha.fill_(0.1 * (i + 1))
            for name, p in block.named_parameters():
                if name != "alpha":
                    p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def test_source_block_maps():
    assert [source_block(j, 4, "adjacent") for j in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [source_block(j, 4, "cross") for j in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize("method", ["adjacent", "cross"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_blocks_copied_by_method(method, backbone):
    model = _trained_like(backbone)
    old = model.state_dict()
    new = stack_state_dict(old, 4, GrowthConfig(method=method, alpha_policy="copy"))
    for j in range(8):
        i = source_block(j, 4, method)
        for key, value in old.items():
            if key.startswith(f"blocks.{i}."):
                torch.testing.assert_close(new[key.replace(f"blocks.{i}.", f"blocks.{j}.", 1)], value, rtol=0, atol=0)
    torch.testing.assert_close(new["item_embedding.weight"], old["item_embedding.weight"], rtol=0, atol=0)
    torch.testing.assert_close(new["head.weight"], old["head.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["adjacent", "cross"])
def test_alpha_policies(method):
    model = _trained_like("nextitnet")
    old_alpha = [b.alpha.item() for b in model.blocks]
    alphas = {}
    for policy in ["reset", "copy", "zero_new"]:
        new = stack_state_dict(model.state_dict(), 4, GrowthConfig(method=method, alpha_policy=policy))
        alphas[policy] = [new[f"blocks.{j}.alpha"].item() for j in range(8)]
    assert alphas["reset"] == [0.0] * 8
    assert alphas["copy"] == [old_alpha[source_block(j, 4, method)] for j in range(8)]
    if method == "adjacent":
        expected = [a for x in old_alpha for a in (x, 0.0)]
    else:
        expected = old_alpha + [0.0] * 4
    assert alphas["zero_new"] == expected


@pytest.mark.parametrize("method", ["adjacent", "cross"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_zero_new_preserves_the_function_exactly(method, backbone):
    model = _trained_like(backbone)
    grown = grow_model(model, GrowthConfig(method=method, alpha_policy="zero_new")).eval()
    assert grown.cfg.num_blocks == 8
    x = torch.randint(1, 40, (3, 10))
    x[0, :4] = 0
    with torch.no_grad():
        torch.testing.assert_close(grown.logits(grown(x)), model.logits(model(x)), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["adjacent", "cross"])
def test_reset_changes_the_function(method):
    model = _trained_like("nextitnet")
    grown = grow_model(model, GrowthConfig(method=method, alpha_policy="reset")).eval()
    x = torch.randint(1, 40, (2, 10))
    with torch.no_grad():
        assert not torch.allclose(grown(x), model(x))


def test_repeatable_4_8_16_preserving():
    model = _trained_like("nextitnet")
    growth = GrowthConfig(method="adjacent", alpha_policy="zero_new")
    grown = grow_model(grow_model(model, growth), growth).eval()
    assert len(grown.blocks) == 16
    x = torch.randint(1, 40, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(grown(x), model(x), rtol=0, atol=0)


def test_reinit_layernorm_and_head_take_fresh_values():
    model = _trained_like("nextitnet")
    fresh_model = build_model(dataclasses.replace(model.cfg, num_blocks=8)).double()
    fresh = fresh_model.state_dict()
    new = stack_state_dict(model.state_dict(), 4, GrowthConfig(copy_layernorm=False, copy_head=False), fresh)
    for key in ["head.weight", "head.bias", "blocks.5.ln1.weight", "blocks.0.ln2.bias"]:
        torch.testing.assert_close(new[key], fresh[key], rtol=0, atol=0)
    torch.testing.assert_close(new["blocks.5.conv1.weight"], model.state_dict()["blocks.2.conv1.weight"], rtol=0, atol=0)


def test_reinit_without_fresh_values_fails_clearly():
    model = _trained_like("nextitnet")
    with pytest.raises(StackingError, match="no fresh value"):
        stack_state_dict(model.state_dict(), 4, GrowthConfig(copy_head=False))


def test_wrong_block_count_fails_clearly():
    state = _trained_like("nextitnet").state_dict()
    with pytest.raises(StackingError, match="num_blocks does not match"):
        stack_state_dict(state, 3, GrowthConfig())


def test_leftover_keys_fail_clearly():
    state = dict(_trained_like("nextitnet").state_dict())
    plan = stacking_plan({k: v.shape for k, v in state.items()}, 4, GrowthConfig())
    state["stray.weight"] = torch.zeros(2)
    from stackrec_dist.growth.stacking import apply_plan

    with pytest.raises(StackingError, match="stray.weight"):
        apply_plan(plan, state)


def test_inconsistent_blocks_fail_clearly():
    state = dict(_trained_like("nextitnet").state_dict())
    state["blocks.2.conv1.weight"] = torch.zeros(16, 16, 5)
    with pytest.raises(StackingError, match="block 2 differs"):
        stack_state_dict(state, 4, GrowthConfig())


def test_check_matches_names_mismatches():
    state = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(StackingError, match=r"missing=\['c'\].*unexpected=\['b'\]"):
        check_matches(state, {"a": torch.Size([2]), "c": torch.Size([1])})


def test_grown_dilations_follow_or_position():
    from stackrec_dist.growth.stacking import grown_block_dilations

    assert grown_block_dilations([1, 4, 1, 4], "adjacent", "follow", [1, 4]) == [1, 1, 4, 4, 1, 1, 4, 4]
    assert grown_block_dilations([1, 4, 1, 4], "cross", "follow", [1, 4]) == [1, 4, 1, 4] * 2
    assert grown_block_dilations([1, 4, 1, 4], "adjacent", "position", [1, 4]) == [1, 4] * 4
    model = _trained_like("nextitnet")
    grown = grow_model(model, GrowthConfig(method="adjacent", dilations="follow"))
    assert [b.dilation for b in grown.blocks] == [1, 1, 4, 4, 1, 1, 4, 4]
