"""Writes checkpoints in the key layout and container of the official code, for tests.

The key names and shapes below are written from the official module structure (read in
juhongm999/hsnet ``model/hsnet.py`` + ``model/learner.py`` + ``model/base/conv4d.py``;
Pbihao/HDMNet ``model/HDMNet.py`` + ``model/Transformer.py`` +
``model/MaskMultiheadAttention.py`` with mmcv/mmseg's PatchEmbed, ConvModule and
MultiheadAttention; chunbolang/BAM ``model/PSPNet.py`` + ``model/resnet.py`` + ``model/PPM.py``),
independently of ``fss.models.checkpoint_io``. Each official key is filled with the tensor of
the corresponding part of one of our models, found by a hand-written table from official
module paths to our module objects; every official shape is asserted, so a part of ours
that does not have the official shape fails here, by name.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

Shape = tuple[int, ...]

# ------------------------------------------------------------------------------ HSNet
# HPNLearner(inch = reversed(nbottlenecks[-3:])): per backbone, the taps of layers 4, 3, 2.
HSNET_TAPS = {"vgg16": (1, 3, 3), "resnet50": (3, 6, 4), "resnet101": (3, 23, 4)}
# make_building_block(in, out_channels, kernel_sizes, strides) of each official block.
HSNET_BLOCKS = {
    "encoder_layer4": ((16, 64, 128), (3, 3, 3)),
    "encoder_layer3": ((16, 64, 128), (5, 3, 3)),
    "encoder_layer2": ((16, 64, 128), (5, 5, 3)),
    "encoder_layer4to3": ((128, 128, 128), (3, 3, 3)),
    "encoder_layer3to2": ((128, 128, 128), (3, 3, 3)),
}
HSNET_DECODERS = {  # nn.Sequential(conv, ReLU, conv[, ReLU]): convs at 0 and 2
    "decoder1": ((128, 128), (64, 128)),
    "decoder2": ((64, 64), (2, 64)),
}


def hsnet_official_shapes(backbone: str) -> dict[str, Shape]:
    """Every key of ``HypercorrSqueezeNetwork(backbone).state_dict()`` and its shape."""
    shapes: dict[str, Shape] = {}
    n4, n3, n2 = HSNET_TAPS[backbone]
    inputs = {"encoder_layer4": n4, "encoder_layer3": n3, "encoder_layer2": n2,
              "encoder_layer4to3": 128, "encoder_layer3to2": 128}
    for block, (outs, kernels) in HSNET_BLOCKS.items():
        channels = inputs[block]
        for i, (out, k) in enumerate(zip(outs, kernels, strict=True)):
            conv, norm = f"hpn_learner.{block}.{3 * i}", f"hpn_learner.{block}.{3 * i + 1}"
            for branch in ("conv1", "conv2"):  # CenterPivotConv4d: two Conv2d with bias
                shapes[f"{conv}.{branch}.weight"] = (out, channels, k, k)
                shapes[f"{conv}.{branch}.bias"] = (out,)
            shapes[f"{norm}.weight"] = shapes[f"{norm}.bias"] = (out,)  # GroupNorm(4, out)
            channels = out
    for decoder, convs in HSNET_DECODERS.items():
        for index, (out, channels) in zip((0, 2), convs, strict=True):
            shapes[f"hpn_learner.{decoder}.{index}.weight"] = (out, channels, 3, 3)
            shapes[f"hpn_learner.{decoder}.{index}.bias"] = (out,)
    # self.backbone = torchvision vgg16 / resnet50 / resnet101, classifier head included.
    with torch.device("meta"):
        torchvision_net = getattr(torchvision.models, backbone)(weights=None)
    for key, value in torchvision_net.state_dict().items():
        shapes[f"backbone.{key}"] = tuple(value.shape)
    return shapes


def hsnet_official_state_dict(model: nn.Module, backbone: str) -> dict[str, Tensor]:
    """``nn.DataParallel(HypercorrSqueezeNetwork).state_dict()`` holding ``model``'s weights.

    The torchvision classifier head (unused by HSNet) gets constant tensors of its real
    shape, stored without their size (``expand``), so a vgg16 file stays small."""
    ours = {
        "hpn_learner.encoder_layer4": model.learner.squeeze_l4,
        "hpn_learner.encoder_layer3": model.learner.squeeze_l3,
        "hpn_learner.encoder_layer2": model.learner.squeeze_l2,
        "hpn_learner.encoder_layer4to3": model.learner.mix_l43,
        "hpn_learner.encoder_layer3to2": model.learner.mix_l32,
        "hpn_learner.decoder1": model.learner.decoder1,
        "hpn_learner.decoder2": model.learner.decoder2,
        "backbone": model.backbone,
    }
    state = {}
    for key, shape in hsnet_official_shapes(backbone).items():
        if key.startswith(("backbone.fc.", "backbone.classifier.")):
            state[key] = torch.full((), 0.5).expand(shape)
        else:
            state[key] = _lookup(ours, key, shape)
    return {f"module.{key}": value for key, value in state.items()}


def write_hsnet_official(model: nn.Module, backbone: str, path: Path) -> Path:
    """``best_model.pt`` as the official ``Logger.save_model_miou`` writes it: the bare
    DataParallel state dict."""
    torch.save(hsnet_official_state_dict(model, backbone), path)
    return path


# ------------------------------------------------------------- PSPNet (BAM / HDMNet)
RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_LAYERS = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))  # get_vgg16_layer


def _batch_norm(prefix: str, channels: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,),
            f"{prefix}.running_mean": (channels,), f"{prefix}.running_var": (channels,),
            f"{prefix}.num_batches_tracked": ()}


def _layer_norm(prefix: str, channels: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,)}


def _conv(prefix: str, out: int, channels: int, k: int, bias: bool) -> dict[str, Shape]:
    shapes = {f"{prefix}.weight": (out, channels, k, k)}
    if bias:
        shapes[f"{prefix}.bias"] = (out,)
    return shapes


def psp_trunk_shapes(backbone: str) -> dict[str, Shape]:
    """layer0 .. layer4 of the official PSPNet (deep-stem ResNet of BAM's model/resnet.py,
    or vgg16_bn features sliced by get_vgg16_layer)."""
    shapes: dict[str, Shape] = {}
    if backbone == "vgg16":
        index, channels = 0, 3
        for value in VGG16_CFG:
            if value == "M":
                index += 1
                continue
            layer, (start, _) = next((i, r) for i, r in enumerate(VGG16_LAYERS)
                                     if r[0] <= index < r[1])
            shapes |= _conv(f"layer{layer}.{index - start}", value, channels, 3, bias=True)
            shapes |= _batch_norm(f"layer{layer}.{index - start + 1}", value)
            index, channels = index + 3, value
        return shapes
    # layer0 = Sequential(conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3, relu3, maxpool)
    for index, out, channels in ((0, 64, 3), (3, 64, 64), (6, 128, 64)):
        shapes |= _conv(f"layer0.{index}", out, channels, 3, bias=False)
        shapes |= _batch_norm(f"layer0.{index + 1}", out)
    inplanes = 128
    for layer, (blocks, planes) in enumerate(zip(RESNET_BLOCKS[backbone], (64, 128, 256, 512),
                                                 strict=True), start=1):
        for block in range(blocks):
            prefix = f"layer{layer}.{block}"
            shapes |= _conv(f"{prefix}.conv1", planes, inplanes, 1, bias=False)
            shapes |= _batch_norm(f"{prefix}.bn1", planes)
            shapes |= _conv(f"{prefix}.conv2", planes, planes, 3, bias=False)
            shapes |= _batch_norm(f"{prefix}.bn2", planes)
            shapes |= _conv(f"{prefix}.conv3", 4 * planes, planes, 1, bias=False)
            shapes |= _batch_norm(f"{prefix}.bn3", 4 * planes)
            if block == 0:  # stride 2 or inplanes != 4 * planes: every first block
                shapes |= _conv(f"{prefix}.downsample.0", 4 * planes, inplanes, 1, bias=False)
                shapes |= _batch_norm(f"{prefix}.downsample.1", 4 * planes)
            inplanes = 4 * planes
    return shapes


def _trunk_channels(backbone: str) -> int:
    return 512 if backbone == "vgg16" else 2048


def pspnet_head_shapes(backbone: str) -> dict[str, Shape]:
    """PPM(fea_dim, fea_dim / 4, bins 1 2 3 6) and cls[0:2] (3×3 conv 2·fea_dim → 512, BN)."""
    channels = _trunk_channels(backbone)
    shapes: dict[str, Shape] = {}
    for branch in range(4):  # Sequential(AdaptiveAvgPool2d, Conv2d, BatchNorm2d, ReLU)
        shapes |= _conv(f"ppm.features.{branch}.1", channels // 4, channels, 1, bias=False)
        shapes |= _batch_norm(f"ppm.features.{branch}.2", channels // 4)
    shapes |= _conv("cls.0", 512, 2 * channels, 3, bias=False)
    shapes |= _batch_norm("cls.1", 512)
    return shapes


def bam_pspnet_shapes(backbone: str, num_classes: int) -> dict[str, Shape]:
    """Every key of BAM's ``PSPNet.OneModel`` (its encoder = the same layer0..4 again)."""
    trunk = psp_trunk_shapes(backbone)
    shapes = dict(trunk) | pspnet_head_shapes(backbone)
    shapes |= _conv("cls.4", num_classes, 512, 1, bias=True)
    for key, shape in trunk.items():
        layer, rest = key.split(".", 1)
        shapes[f"encoder.{layer[len('layer'):]}.{rest}"] = shape
    return shapes


def bam_pspnet_state_dict(pspnet: nn.Module, backbone: str) -> dict[str, Tensor]:
    """DDP ``OneModel.state_dict()`` of BAM's PSPNet holding ``pspnet``'s weights."""
    ours = {f"layer{i}": getattr(pspnet, f"layer{i}") for i in range(5)}
    ours |= {f"encoder.{i}": getattr(pspnet, f"layer{i}") for i in range(5)}
    ours |= {"ppm": pspnet.ppm, "cls": pspnet.cls}
    shapes = bam_pspnet_shapes(backbone, pspnet.cls[4].out_channels)
    return {f"module.{key}": _lookup(ours, key, shape) for key, shape in shapes.items()}


def write_bam_pspnet(pspnet: nn.Module, backbone: str, path: Path) -> Path:
    """``best.pth`` as BAM's train_base.py writes it (then copies to best.pth)."""
    optimizer = {"state": {}, "param_groups": [
        {"lr": 2.5e-4, "momentum": 0.9, "dampening": 0, "weight_decay": 1e-4,
         "nesterov": False, "params": [0, 1, 2]}]}
    torch.save({"epoch": 17, "state_dict": bam_pspnet_state_dict(pspnet, backbone),
                "optimizer": optimizer}, path)
    return path


# ------------------------------------------------------------------------------ HDMNet
STAGE_KERNELS, STAGE_SR = (1, 3, 3), (4, 2, 1)  # down_patch_sizes, down_sr_ratio
DIM, HIDDEN = 64, 256  # embed_dims, mlp_ratio * embed_dims


def _encoder_layer(prefix: str, sr_ratio: int) -> dict[str, Shape]:
    """TransformerEncoderLayer: norm1, attn (EfficientMultiheadAttention: attn =
    MaskMultiHeadAttention without bias, sr + norm when sr_ratio > 1), norm2, ffn (MixFFN:
    layers = [fc1, pe_conv, act, drop, fc2, drop])."""
    shapes = _layer_norm(f"{prefix}.norm1", DIM) | _layer_norm(f"{prefix}.norm2", DIM)
    for name in ("q", "k", "v", "o"):
        shapes[f"{prefix}.attn.attn.linear_{name}.weight"] = (DIM, DIM)
    if sr_ratio > 1:
        shapes |= _conv(f"{prefix}.attn.sr", DIM, DIM, sr_ratio, bias=True)
        shapes |= _layer_norm(f"{prefix}.attn.norm", DIM)
    shapes |= _conv(f"{prefix}.ffn.layers.0", HIDDEN, DIM, 1, bias=True)
    shapes[f"{prefix}.ffn.layers.1.weight"] = (HIDDEN, 1, 3, 3)  # depth-wise
    shapes[f"{prefix}.ffn.layers.1.bias"] = (HIDDEN,)
    shapes |= _conv(f"{prefix}.ffn.layers.4", DIM, HIDDEN, 1, bias=True)
    return shapes


def mix_transformer_shapes() -> dict[str, Shape]:
    """``Transformer.mix_transformer`` (MixVisionTransformer, 3 stages)."""
    shapes: dict[str, Shape] = {}
    for i in range(3):
        stage = f"down_sample_layers.{i}"
        # [PatchEmbed(projection, norm), encoder layer, encoder layer, LayerNorm]
        shapes |= _conv(f"{stage}.0.projection", DIM, DIM, STAGE_KERNELS[i], bias=True)
        shapes |= _layer_norm(f"{stage}.0.norm", DIM)
        shapes |= _encoder_layer(f"{stage}.1", STAGE_SR[i]) | _encoder_layer(f"{stage}.2", STAGE_SR[i])
        shapes |= _layer_norm(f"{stage}.3", DIM)
        # [encoder layer (sr 1), ConvModule(66 → 64, 3×3, SyncBN): conv + bn]
        shapes |= _encoder_layer(f"match_layers.{i}.0", 1)
        shapes |= _conv(f"match_layers.{i}.1.conv", DIM, DIM + 2, 3, bias=False)
        shapes |= _batch_norm(f"match_layers.{i}.1.bn", DIM)
        parse = f"parse_layers.{i}"
        shapes |= _conv(f"{parse}.0", 4 * DIM, DIM, 1, bias=True) | _batch_norm(f"{parse}.1", 4 * DIM)
        shapes |= _conv(f"{parse}.2", 4 * DIM, 4 * DIM, 3, bias=True)
        shapes |= _batch_norm(f"{parse}.3", 4 * DIM)
        shapes |= _conv(f"{parse}.4", DIM, 4 * DIM, 1, bias=True) | _batch_norm(f"{parse}.5", DIM)
    shapes |= _conv("cls.0", 4 * DIM, DIM, 1, bias=True) | _batch_norm("cls.1", 4 * DIM)
    shapes |= _conv("cls.2", 4 * DIM, 4 * DIM, 3, bias=True) | _batch_norm("cls.3", 4 * DIM)
    shapes |= _conv("cls.4", 2, 4 * DIM, 1, bias=True)
    return shapes


def hdmnet_official_shapes(backbone: str, num_classes: int, shot: int) -> dict[str, Shape]:
    """Every key of HDMNet's ``OneModel.state_dict()`` and its shape."""
    shapes = psp_trunk_shapes(backbone) | pspnet_head_shapes(backbone)
    shapes |= _conv("base_learnear.2", num_classes, 512, 1, bias=True)  # PSPNet cls[4]
    feature_dim = 512 + 256 if backbone == "vgg16" else 1024 + 512
    shapes |= _conv("down_query.0", 256, feature_dim, 1, bias=False)
    shapes |= _conv("down_supp.0", 256, feature_dim, 1, bias=False)
    shapes |= _conv("query_merge.0", DIM, 512 + 2, 1, bias=False)
    shapes |= _conv("supp_merge.0", DIM, 512, 1, bias=False)
    shapes |= {f"transformer.mix_transformer.{k}": v for k, v in mix_transformer_shapes().items()}
    shapes |= _conv("gram_merge", 1, 2, 1, bias=False) | _conv("cls_merge", 1, 2, 1, bias=False)
    if shot > 1:  # kshot_trans_dim = 2
        shapes |= _conv("kshot_rw.0", 2, shot, 1, bias=True) | _conv("kshot_rw.2", shot, 2, 1, bias=True)
    return shapes


def hdmnet_official_state_dict(model: nn.Module, backbone: str) -> dict[str, Tensor]:
    """DDP ``OneModel.state_dict()`` of the official HDMNet holding ``model``'s weights."""
    pspnet = model.pspnet
    ours = {f"layer{i}": getattr(pspnet, f"layer{i}") for i in range(5)}
    ours |= {"ppm": pspnet.ppm, "cls.0": pspnet.cls[0], "cls.1": pspnet.cls[1],
             "base_learnear.2": pspnet.cls[4], "down_query": model.down_query,
             "down_supp": model.down_supp, "query_merge": model.query_merge,
             "supp_merge": model.supp_merge, "transformer.mix_transformer": model.transformer,
             "gram_merge": model.ensemble.gram_merge, "cls_merge": model.ensemble.cls_merge}
    if model.ensemble.kshot_rw is not None:
        ours["kshot_rw"] = model.ensemble.kshot_rw
    shapes = hdmnet_official_shapes(backbone, pspnet.num_classes, model.shot)
    return {f"module.{key}": _lookup(ours, key, shape) for key, shape in shapes.items()}


def write_hdmnet_official(model: nn.Module, backbone: str, path: Path) -> Path:
    """``train_epoch_<e>_<miou>.pth`` as the official train.py writes it."""
    optimizer = {"state": {}, "param_groups": [
        {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
         "amsgrad": False, "params": [0, 1]}]}
    torch.save({"epoch": 42, "state_dict": hdmnet_official_state_dict(model, backbone),
                "optimizer": optimizer}, path)
    return path


# ------------------------------------------------------------------------------ common
def _lookup(ours: dict[str, nn.Module], key: str, shape: Shape) -> Tensor:
    """The tensor of our module registered for the longest official prefix of ``key``."""
    prefix = max((p for p in ours if key.startswith(p + ".")), key=len, default=None)
    if prefix is None:
        raise KeyError(f"no module of ours is mapped to the official key {key}")
    state = ours[prefix].state_dict()
    rest = key[len(prefix) + 1:]
    if rest not in state:
        raise KeyError(f"official key {key}: our {type(ours[prefix]).__name__} has no {rest!r}")
    value = state[rest]
    if tuple(value.shape) != shape:
        raise AssertionError(f"official key {key} has shape {shape}, ours {tuple(value.shape)}")
    return value.detach().clone()
