"""Feature backbones: taps, weight loading, freezing."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fss.models import build_backbone
from fss.models.backbones import BACKBONE_NAMES, _block_pre_activation

EXPECTED_GROUPS = {
    "vgg16": [2, 2, 2, 3, 3, 3, 4],
    "resnet18": [2, 2, 3, 3, 4, 4],
    "resnet50": [2] * 4 + [3] * 6 + [4] * 3,
    "resnet101": [2] * 4 + [3] * 23 + [4] * 3,
}
EXPECTED_CHANNELS = {
    "vgg16": [512] * 7,
    "resnet18": [128, 128, 256, 256, 512, 512],
    "resnet50": [512] * 4 + [1024] * 6 + [2048] * 3,
    "resnet101": [512] * 4 + [1024] * 23 + [2048] * 3,
}


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics, so that eval-mode BN is not the identity."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)


def _torchvision_layers(net: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of layer2, layer3, layer4 of a torchvision ResNet."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    x = net.layer1(x)
    outputs = []
    for layer in (net.layer2, net.layer3, net.layer4):
        x = layer(x)
        outputs.append(x)
    return outputs


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_taps_shapes_groups_and_channels(name: str) -> None:
    backbone = build_backbone(name)
    assert backbone.name == name
    assert backbone.tap_groups == EXPECTED_GROUPS[name]
    assert backbone.tap_channels == EXPECTED_CHANNELS[name]
    with torch.no_grad():
        taps = backbone(torch.randn(1, 3, 64, 96))
    assert len(taps) == len(EXPECTED_GROUPS[name])
    stride = {2: 8, 3: 16, 4: 32}
    for tap, level, channels in zip(taps, backbone.tap_groups, backbone.tap_channels, strict=True):
        assert tap.shape == (1, channels, 64 // stride[level], 96 // stride[level])
    levels = backbone.level_outputs(taps)
    assert [t.shape[1] for t in levels] == backbone.level_channels
    assert all((t >= 0).all() for t in levels)


def test_unknown_name_lists_accepted() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet34'.*vgg16.*resnet50.*resnet101"):
        build_backbone("resnet34")


def test_bottleneck_taps_are_pre_relu() -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    _randomise_batchnorm(reference)
    backbone = build_backbone("resnet50")
    backbone.load_state_dict({k: v for k, v in reference.state_dict().items() if "fc." not in k})
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        taps = backbone(images)
        x = reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        )
        block = reference.layer2[0]
        # The bottleneck by hand: body, plus the projected identity, no final ReLU.
        body = torch.relu(block.bn1(block.conv1(x)))
        body = torch.relu(block.bn2(block.conv2(body)))
        body = block.bn3(block.conv3(body))
        expected = body + block.downsample(x)
        torch.testing.assert_close(taps[0], expected)
        # Every tap, after ReLU, is torchvision's own block output.
        index = 0
        for layer in (reference.layer2, reference.layer3, reference.layer4):
            for block in layer:
                x = block(x)
                torch.testing.assert_close(torch.relu(taps[index]), x)
                index += 1
    assert index == len(taps) == 13
    assert all((tap < 0).any() for tap in taps)


def test_basicblock_taps_are_pre_relu() -> None:
    torch.manual_seed(1)
    reference = torchvision.models.resnet18().eval()
    _randomise_batchnorm(reference, seed=1)
    backbone = build_backbone("resnet18")
    backbone.load_state_dict({k: v for k, v in reference.state_dict().items() if "fc." not in k})
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        taps = backbone(images)
        x = reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        )
        block = reference.layer2[0]
        body = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        torch.testing.assert_close(taps[0], body + block.downsample(x))
        torch.testing.assert_close(_block_pre_activation(block, x), taps[0])
    assert all((tap < 0).any() for tap in taps)


def test_vgg_taps_are_pre_relu_conv_and_pool5() -> None:
    backbone = build_backbone("vgg16")
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        taps = backbone(images)
        # Reference: run torchvision's modules, cloning before each in-place ReLU.
        x, expected = images, {}
        for index, module in enumerate(backbone.features):
            x = module(x.clone())
            expected[index] = x.clone() if index in (17, 19, 21, 24, 26, 28, 30) else None
    for tap, index in zip(taps, (17, 19, 21, 24, 26, 28, 30), strict=True):
        torch.testing.assert_close(tap, expected[index])
    assert all((tap < 0).any() for tap in taps[:6])
    assert (taps[6] >= 0).all()  # pool5 of ReLU outputs
    assert taps[6].shape == (1, 512, 2, 2)


def test_torchvision_state_dict_file_gives_identical_features(tmp_path) -> None:
    torch.manual_seed(2)
    reference = torchvision.models.resnet18().eval()
    _randomise_batchnorm(reference, seed=2)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("resnet18", weights=str(path))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = backbone.level_outputs(backbone(images))
        theirs = _torchvision_layers(reference, images)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": {f"model.backbone.{k}": v for k, v in sd.items()}, "epoch": 3},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        # A whole-model checkpoint: the backbone's keys next to a learner's and a head's.
        lambda sd: {
            "state_dict": {
                **{f"model.backbone.{k}": v for k, v in sd.items()},
                "model.learner.squeeze_l4.0.conv1.weight": torch.zeros(3),
                "model.head.fc.weight": torch.zeros(2),
            }
        },
    ],
    ids=["lightning", "dataparallel", "whole-model"],
)
def test_prefixed_checkpoints_load(tmp_path, wrap) -> None:
    reference = torchvision.models.resnet18().eval()
    path = tmp_path / "checkpoint.ckpt"
    torch.save(wrap(reference.state_dict()), path)
    backbone = build_backbone("resnet18", weights=path)
    torch.testing.assert_close(backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_vgg_features_state_dict_loads_and_ignores_classifier(tmp_path) -> None:
    source = build_backbone("vgg16")
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(10, 4)  # head keys are ignored
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    backbone = build_backbone("vgg16", weights=path)
    torch.testing.assert_close(backbone.features[28].weight, source.features[28].weight)


def test_imagenet_weights_use_torchvision_enum(monkeypatch) -> None:
    reference = torchvision.models.resnet18()
    calls = []

    def fake_get_state_dict(self, progress=True, **kwargs):
        calls.append(self)
        return reference.state_dict()

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", fake_get_state_dict)
    backbone = build_backbone("resnet18", weights="imagenet")
    assert calls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    torch.testing.assert_close(backbone.conv1.weight, reference.conv1.weight)


def test_mismatched_file_gives_one_line_error(tmp_path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError) as info:
        build_backbone("resnet50", weights=path)
    message = str(info.value)
    assert "\n" not in message
    assert "resnet50" in message and "missing keys" in message and "shape mismatches" in message

    state = torchvision.models.resnet18().state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(1, 2, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"1 unexpected keys.*1 shape mismatches.*layer2\.0\.conv1"
    ):
        build_backbone("resnet18", weights=path)


def test_missing_path_gives_clear_error(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*do not exist.*'imagenet'"):
        build_backbone("resnet18", weights=str(missing))


def test_frozen_backbone_stays_eval_and_gets_no_grads() -> None:
    backbone = build_backbone("resnet18", weights="none")
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training
    assert all(not m.training for m in backbone.modules())
    wrapper = nn.Sequential(backbone)
    wrapper.train()
    assert not backbone.training

    trainable = build_backbone("resnet18", frozen=False)
    trainable.train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
