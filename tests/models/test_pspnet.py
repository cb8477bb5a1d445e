"""PSPNet base learner and its backbones (deep-stem dilated ResNet, VGG16-bn)."""

from __future__ import annotations

import pytest
import torch

from fss.models.psp_backbones import DEEP_STEM_CONFIGS, build_psp_backbone
from fss.models.pspnet import PSPNet, check_input_size, load_pspnet_checkpoint

torch.set_num_threads(1)


def official_deep_stem_layout(blocks, stem=(64, 64, 128), planes=(64, 128, 256, 512)):
    """Key → shape of a ``resnet50_v2.pth``-style file, written from the architecture
    (independently of fss.models.psp_backbones)."""

    def bn(prefix, channels):
        return {
            f"{prefix}.{name}": (channels,)
            for name in ("weight", "bias", "running_mean", "running_var")
        }

    layout = {"conv1.weight": (stem[0], 3, 3, 3), **bn("bn1", stem[0])}
    layout |= {"conv2.weight": (stem[1], stem[0], 3, 3), **bn("bn2", stem[1])}
    layout |= {"conv3.weight": (stem[2], stem[1], 3, 3), **bn("bn3", stem[2])}
    in_channels = stem[2]
    for stage, (count, width) in enumerate(zip(blocks, planes, strict=True), start=1):
        for block in range(count):
            p = f"layer{stage}.{block}"
            layout[f"{p}.conv1.weight"] = (width, in_channels, 1, 1)
            layout |= bn(f"{p}.bn1", width)
            layout[f"{p}.conv2.weight"] = (width, width, 3, 3)
            layout |= bn(f"{p}.bn2", width)
            layout[f"{p}.conv3.weight"] = (width * 4, width, 1, 1)
            layout |= bn(f"{p}.bn3", width * 4)
            if block == 0:
                layout[f"{p}.downsample.0.weight"] = (width * 4, in_channels, 1, 1)
                layout |= bn(f"{p}.downsample.1", width * 4)
            in_channels = width * 4
    layout["fc.weight"] = (1000, in_channels)
    layout["fc.bias"] = (1000,)
    return layout


def make_state(layout):
    return {
        key: torch.full(shape, float(i % 97) / 97) for i, (key, shape) in enumerate(layout.items())
    }


def test_resnet50_stage_shapes_and_strides():
    model = PSPNet("resnet50").eval()
    with torch.no_grad():
        features = model.extract_features(torch.randn(1, 3, 65, 65))
    assert features.layer0.shape == (1, 128, 17, 17)
    assert features.layer1.shape == (1, 256, 17, 17)
    assert features.layer2.shape == (1, 512, 9, 9)
    assert features.layer3.shape == (1, 1024, 9, 9)
    assert features.layer4.shape == (1, 2048, 9, 9)
    assert features.feat5.shape == (1, 512, 9, 9)
    # Deep stem, stride on the 3×3 conv, dilation 2 / 4 on every block of layer3 / layer4.
    assert model.layer0[0].stride == (2, 2) and model.layer0[3].in_channels == 64
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)
    assert all(block.conv2.dilation == (2, 2) for block in model.layer3)
    assert all(block.conv2.dilation == (4, 4) for block in model.layer4)
    assert model.layer3[0].downsample[0].stride == (1, 1)
    # Head: PPM 4 × (2048 → 512), cls 4096 → 512 → 16.
    assert [branch[1].out_channels for branch in model.ppm.features] == [512] * 4
    assert model.cls[0].in_channels == 4096 and model.cls[4].out_channels == 16


def test_pspnet_forward_shape_and_api():
    model = PSPNet("resnet_small", num_classes=16).eval()
    images = torch.randn(2, 3, 65, 65)
    logits = model(images)
    assert logits.shape == (2, 16, 65, 65)
    assert model.predict(images).dtype == torch.int64
    features = model.extract_features(images)
    base = model.base_learner(features.feat5)
    assert base.shape == (2, 16, 9, 9)
    # forward == base learner on feat5, upsampled.
    upsampled = torch.nn.functional.interpolate(
        base, size=(65, 65), mode="bilinear", align_corners=True
    )
    torch.testing.assert_close(logits, upsampled)
    model.train()
    out = model.training_loss(images, torch.randint(0, 16, (2, 65, 65)))
    out["loss"].backward()
    groups = model.trainable_parameters()
    assert [g["lr_scale"] for g in groups] == [1.0, 10.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_vgg16_slicing():
    model = PSPNet("vgg16").eval()
    assert [len(layer) for layer in model.backbone_modules()] == [7, 7, 10, 10, 9]
    with torch.no_grad():
        features = model.extract_features(torch.randn(1, 3, 65, 65))
    assert [f.shape[1] for f in (features.layer2, features.layer3, features.layer4)] == [
        256,
        512,
        512,
    ]
    assert features.layer2.shape[-1] == 9 and features.layer3.shape[-1] == 5  # ceil-mode pools
    assert model.cls[0].in_channels == 1024


def test_input_size_rule():
    check_input_size(473, 633)
    with pytest.raises(ValueError, match=r"\(size - 1\) % 8 == 0.*128 → 121 or 129"):
        check_input_size(128, 129)
    check_input_size(128, 128, strict=False)
    with pytest.raises(ValueError, match="too small"):
        check_input_size(9, 9, strict=False)
    model = PSPNet("resnet_small").eval()
    with pytest.raises(ValueError, match="strict_size=False"):
        model(torch.randn(1, 3, 64, 64))
    relaxed = PSPNet("resnet_small", strict_size=False).eval()
    assert relaxed(torch.randn(1, 3, 64, 64)).shape == (1, 16, 64, 64)


def test_deep_stem_layout_matches_official_file():
    for name, blocks in (("resnet50", (3, 4, 6, 3)), ("resnet101", (3, 4, 23, 3))):
        assert DEEP_STEM_CONFIGS[name].blocks == blocks
    layout = official_deep_stem_layout((3, 4, 6, 3))
    from fss.models.psp_backbones import DeepStemResNet

    own = {
        k: tuple(v.shape)
        for k, v in DeepStemResNet(DEEP_STEM_CONFIGS["resnet50"]).state_dict().items()
    }
    own = {k: v for k, v in own.items() if not k.endswith("num_batches_tracked")}
    expected = {k: v for k, v in layout.items() if not k.startswith("fc.")}
    assert own == expected


def test_deep_stem_weight_file_loading(tmp_path):
    config = DEEP_STEM_CONFIGS["resnet_small"]
    layout = official_deep_stem_layout(config.blocks, config.stem_widths, config.planes)
    state = make_state(layout)
    path = tmp_path / "resnet_small_v2.pth"
    torch.save(state, path)
    stages, channels = build_psp_backbone("resnet_small", path)
    assert channels == [32, 64, 128, 256, 512]
    torch.testing.assert_close(stages[0][0].weight, state["conv1.weight"])  # layer0.0 = conv1
    torch.testing.assert_close(stages[0][7].running_var, state["bn3.running_var"])
    torch.testing.assert_close(stages[2][0].downsample[1].bias, state["layer2.0.downsample.1.bias"])
    # Through PSPNet too.
    model = PSPNet("resnet_small", backbone_weights=path)
    torch.testing.assert_close(model.layer4[0].conv3.weight, state["layer4.0.conv3.weight"])

    with pytest.raises(FileNotFoundError, match="not found"):
        build_psp_backbone("resnet_small", tmp_path / "absent.pth")
    broken = dict(state)
    del broken["layer3.0.bn2.running_mean"]
    broken["layer9.0.conv1.weight"] = torch.zeros(1)
    broken["conv2.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as error:
        build_psp_backbone("resnet_small", tmp_path / "broken.pth")
    message = str(error.value)
    assert "layer3.0.bn2.running_mean" in message and "layer9.0.conv1.weight" in message
    assert "conv2.weight: file (3, 3, 3, 3)" in message
    with pytest.raises(ValueError, match="local file"):
        build_psp_backbone("resnet50", "imagenet")


def test_official_pspnet_checkpoint_and_class_count(tmp_path):
    source = PSPNet("resnet_small", num_classes=16)
    # Official best.pth: DDP "module." prefix and the duplicated "encoder.N" keys.
    official = {f"module.{k}": v for k, v in source.state_dict().items()}
    official |= {
        f"module.encoder.0.{k[7:]}": v
        for k, v in source.state_dict().items()
        if k.startswith("layer0.")
    }
    target = PSPNet("resnet_small", num_classes=16)
    load_pspnet_checkpoint(target, {"epoch": 3, "state_dict": official})
    torch.testing.assert_close(target.cls[4].weight, source.cls[4].weight)

    path = tmp_path / "best.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, path)
    load_pspnet_checkpoint(target, path, prefix="model.")

    with pytest.raises(ValueError, match=r"16 classifier outputs but the model expects 61"):
        load_pspnet_checkpoint(PSPNet("resnet_small", num_classes=61), source.state_dict())
