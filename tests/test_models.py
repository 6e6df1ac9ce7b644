import pytest
import torch

from remedis.models import CheckpointError, create_backbone, load_checkpoint, save_checkpoint
from remedis.models.external import load_external_weights


@pytest.mark.parametrize("name", ["resnetv2_18_bit", "resnet18"])
def test_backbones_expose_features_and_head(name):
    net = create_backbone(name, in_chans=1)
    feats = net.forward_features(torch.zeros(2, 1, 32, 32))
    assert feats.ndim == 4
    assert net.forward_head(feats).shape == (2, net.num_features)


def test_bit_small_uses_weight_standardisation_and_groupnorm():
    from timm.layers import GroupNormAct, StdConv2d

    net = create_backbone("resnetv2_18_bit")
    assert any(isinstance(m, StdConv2d) for m in net.modules())
    assert any(isinstance(m, GroupNormAct) for m in net.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="unknown backbone 'resnet_nope'"):
        create_backbone("resnet_nope")


def test_external_rgb_weights_load_into_one_channel_model(tmp_path):
    rgb = create_backbone("resnetv2_18_bit", in_chans=3)
    state = {f"module.{k}": v for k, v in rgb.state_dict().items()}
    state["module.head.fc.weight"] = torch.zeros(10, 512)  # a classifier head the backbone does not have
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    gray = create_backbone("resnetv2_18_bit", in_chans=1)
    load_external_weights(gray, tmp_path / "w.pth")
    # timm's adapt_input_conv: 3 -> 1 channel sums the RGB filters
    assert torch.allclose(gray.stem.conv.weight, rgb.stem.conv.weight.sum(1, keepdim=True), atol=1e-6)
    key = "stages.1.blocks.0.conv1.weight"
    assert torch.equal(gray.state_dict()[key], rgb.state_dict()[key])


def test_adapted_first_conv_sees_gray_as_rgb(tmp_path):
    # With plain convs, summed RGB filters on a gray image equal the RGB model on that image repeated.
    rgb = create_backbone("resnet18", in_chans=3).eval()
    torch.save(rgb.state_dict(), tmp_path / "r18.pth")
    gray = create_backbone("resnet18", in_chans=1).eval()
    load_external_weights(gray, tmp_path / "r18.pth")
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gray.forward_features(x), rgb.forward_features(x.expand(1, 3, 32, 32)), atol=1e-4)


def test_external_weights_of_another_architecture_name_the_keys(tmp_path):
    torch.save(create_backbone("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match=r"r18.pth: weights do not match the architecture: missing keys \['stem"):
        load_external_weights(create_backbone("resnetv2_18_bit"), tmp_path / "r18.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: cannot read weights"):
        load_external_weights(create_backbone("resnet18"), tmp_path / "junk.pth")


def test_checkpoint_roundtrip_and_corruption_detected(tmp_path):
    net = create_backbone("resnet18")
    folder = save_checkpoint(tmp_path / "ckpt", net.state_dict(), {"kind": "backbone", "architecture": "resnet18"})
    state, meta = load_checkpoint(folder)
    assert meta["kind"] == "backbone" and all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert not list(tmp_path.glob(".ckpt*"))  # no temporary folder left behind
    save_checkpoint(tmp_path / "ckpt", net.state_dict(), {"kind": "backbone", "architecture": "resnet18", "v": 2})
    assert load_checkpoint(folder)[1]["v"] == 2  # replaced atomically
    blob = bytearray((folder / "model.safetensors").read_bytes())
    blob[-10] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="hash does not match"):
        load_checkpoint(folder)


def test_folded_std_conv_gives_the_same_outputs():
    from remedis.models.backbones import fold_std_conv

    net = create_backbone("resnetv2_18_bit").eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        before = net.forward_head(net.forward_features(x))
        fold_std_conv(net)
        after = net.forward_head(net.forward_features(x))
    from timm.layers import StdConv2d

    assert not any(isinstance(m, StdConv2d) for m in net.modules())
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
