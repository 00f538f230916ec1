import dataclasses

import pytest
import torch

from stackrec_dist.config import ModelConfig
from stackrec_dist.models import PAD_ID, build_model

BACKBONES = ["nextitnet", "sasrec"]


def _model(backbone: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, num_items=30, dim=16, num_blocks=3, max_len=12, **kw)
    model = build_model(cfg).double()
    # alpha = 0 would make every block the identity and the tests below vacuous.
    with torch.no_grad():
        for block in model.blocks:
            block.alpha.fill_(0.7)
    return model.eval()


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 30, (4, 12), generator=g)
    x[1, :5] = PAD_ID
    x[2, :11] = PAD_ID
    return x


@pytest.mark.parametrize("backbone", BACKBONES)
def test_position_never_sees_the_future(backbone):
    model = _model(backbone)
    x = _batch()
    base = model(x)
    for t in range(x.shape[1] - 1):
        perturbed = x.clone()
        perturbed[:, t + 1:] = torch.randint(1, 30, perturbed[:, t + 1:].shape)
        out = model(perturbed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-12)
        # and it does see the past: changing position t changes position t's output
    changed = x.clone()
    changed[0, 5] = (changed[0, 5] % 29) + 1
    assert not torch.allclose(model(changed)[0, 5], base[0, 5])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_pad_positions_are_zero_and_masked(backbone):
    model = _model(backbone)
    x = _batch()
    out = model(x)
    assert torch.all(out[x == PAD_ID] == 0)
    assert torch.all(out[x != PAD_ID].abs().sum(-1) > 0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_output_independent_of_left_padding(backbone):
    model = _model(backbone)
    seq = torch.tensor([[5, 9, 2, 7, 3]])
    short = model(seq)
    padded = model(torch.cat([torch.zeros(1, 7, dtype=torch.long), seq], dim=1))
    torch.testing.assert_close(padded[:, -5:], short, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_alpha_starts_at_zero_so_blocks_are_identity(backbone):
    cfg = ModelConfig(backbone=backbone, num_items=30, dim=16, num_blocks=4, max_len=12)
    model = build_model(cfg).eval()
    assert all(block.alpha.item() == 0.0 for block in model.blocks)
    x = _batch()
    emb = model.item_embedding(x)
    if backbone == "nextitnet":
        torch.testing.assert_close(model(x), emb * (x != 0).unsqueeze(-1))


def test_no_alpha_ablation_has_no_alpha_parameter():
    model = build_model(ModelConfig(num_items=10, dim=8, num_blocks=2, use_alpha=False))
    assert not any(name.endswith("alpha") for name, _ in model.named_parameters())


def test_dilations_cycle_over_blocks():
    model = build_model(ModelConfig(num_items=10, dim=8, num_blocks=5, dilations=[1, 4]))
    assert [b.dilation for b in model.blocks] == [1, 4, 1, 4, 1]


def test_pad_embedding_is_zero_and_receives_no_gradient():
    model = build_model(ModelConfig(num_items=10, dim=8, num_blocks=2))
    assert torch.all(model.item_embedding.weight[PAD_ID] == 0)
    x = torch.tensor([[0, 0, 3, 4]])
    model(x).sum().backward()
    assert torch.all(model.item_embedding.weight.grad[PAD_ID] == 0)


def test_num_items_must_be_known():
    with pytest.raises(ValueError, match="num_items"):
        build_model(ModelConfig(num_items=0))


def test_logits_cover_the_catalogue():
    model = build_model(ModelConfig(num_items=10, dim=8, num_blocks=2))
    assert model.logits(model(torch.tensor([[1, 2, 3]]))).shape == (1, 3, 10)
