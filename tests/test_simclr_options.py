"""SimCLR recipe options: 3-layer projection head, LARS, histogram equalisation and elastic views."""

import pytest
import torch

from remedis.config import ConfigError, RunConfig
from remedis.models.backbones import create_backbone
from remedis.pretrain.heads import ProjectionHead
from remedis.pretrain.simclr import SimCLRModule, lars
from remedis.training.transforms import SimCLRAugment


def test_projection_head_depth():
    head = ProjectionHead(64, 32, 16, num_layers=3)
    assert sum(isinstance(m, torch.nn.Linear) for m in head) == 3
    assert head(torch.randn(5, 64)).shape == (5, 16)


def test_lars_excludes_biases_and_norms_and_matches_the_lars_rule():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = lars(module, lr=0.5, weight_decay=1e-2)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-2 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(module[0].weight)}
    # one step from zero momentum, by hand (You et al. 2017): trust = 0.001*|w| / (|g| + wd*|w|);
    # update = lr * trust * (g + wd*w)
    w = module[0].weight.detach().clone()
    module(torch.randn(8, 4)).pow(2).sum().backward()
    g = module[0].weight.grad.detach().clone()
    trust = 0.001 * w.norm() / (g.norm() + 1e-2 * w.norm())
    opt.step()
    torch.testing.assert_close(module[0].weight.detach(), w - 0.5 * trust * (g + 1e-2 * w), rtol=1e-5, atol=1e-7)


def test_simclr_step_with_lars_and_three_layer_head():
    module = SimCLRModule(create_backbone("resnet18", 1), projection_layers=3, optimizer="lars", lr=0.3)
    assert sum(isinstance(m, torch.nn.Linear) for m in module.projection) == 3
    v1, v2 = torch.randn(2, 6, 1, 32, 32).unbind(0)
    module.projection.train()
    loss = module.criterion(*module.project(torch.cat([v1, v2])).float().chunk(2))
    assert torch.isfinite(loss) and loss.item() > 0


@pytest.mark.parametrize("option", [{"hist_eq_prob": 1.0}, {"elastic_prob": 1.0}])
def test_optional_views_change_the_image_and_stay_in_range(option):
    x = torch.linspace(0, 0.5, 48 * 48).view(1, 48, 48)
    plain, extra = SimCLRAugment(48, seed=0), SimCLRAugment(48, seed=0, **option)
    a, b = plain(x), extra(x)
    assert b.shape == (1, 48, 48) and not torch.allclose(a, b)
    # the view is an image, not a clamped blow-out: most pixels stay strictly inside (0, 1)
    assert ((b <= 0) | (b >= 1)).float().mean() < 0.5


def test_simclr_options_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  simclr: {optimizer: sgd}\n")
    with pytest.raises(ConfigError, match="pretrain.simclr.optimizer"):
        RunConfig.from_yaml(path)
    path.write_text("pretrain:\n  simclr: {elastic_prob: 2}\n")
    with pytest.raises(ConfigError, match="pretrain.simclr.elastic_prob"):
        RunConfig.from_yaml(path)


def test_fine_tune_augment_strength_scales_the_distortion():
    from remedis.training.transforms import FineTuneAugment

    x = torch.linspace(0.1, 0.6, 48 * 48).view(1, 48, 48)
    flips = [FineTuneAugment(48, seed=s, strength=0)(x) for s in range(8)]
    assert all(torch.allclose(v, x, atol=1e-5) or torch.allclose(v, x.flip(-1), atol=1e-5) for v in flips)  # 0: flip alone

    def mean_change(strength: float) -> float:  # how far views move from the image, flips undone
        aug = FineTuneAugment(48, seed=0, strength=strength)
        out = []
        for _ in range(64):
            v = aug(x)
            out.append(min((v - x).abs().mean(), (v - x.flip(-1)).abs().mean()))
        return float(torch.stack(out).mean())

    light, strong = mean_change(1.0), mean_change(3.0)
    assert 0 < light < strong
    v = FineTuneAugment(48, seed=1, strength=3.0)(x)
    assert v.shape == (1, 48, 48) and ((v <= 0) | (v >= 1)).float().mean() < 0.5  # strong, yet not a blow-out
    with pytest.raises(ValueError, match="strength"):
        FineTuneAugment(48, strength=-1)


def test_sweep_grid_options_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    for text, match in [("adapt: {sweep_augment_strengths: [1.0]}\n", r"adapt\.sweep_augment_strengths.*repeats"),
                        ("adapt: {sweep_weight_decays: [-0.1]}\n", r"adapt\.weight_decay.*>= 0"),
                        ("adapt: {sweep_lrs: [0]}\n", r"adapt\.lr.*> 0"),
                        ("pretrain:\n  supervised: {augment_strength: -1}\n", r"pretrain\.supervised\.augment_strength")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            RunConfig.from_yaml(path)
