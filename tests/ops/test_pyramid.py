"""fss.ops.pyramid: PSPNet's head convolution with the pyramid bins kept at their own size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fss.models.pspnet import PSPNet
from fss.ops import fast_paths
from fss.ops.pyramid import (
    conv2d_over_pyramid,
    conv2d_over_pyramid_reference,
    interpolation_matrix,
)
from tests.helpers.isa import run_json_script

# On a 13x11 map: interior, full height at the left border, the bottom-right corner, empty.
BOXES = [(2, 9, 3, 7), (0, 13, 0, 2), (12, 13, 10, 11), (0, 0, 0, 0)]


def _inputs(batch=4, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 13, 11, generator=generator, dtype=dtype)
    pyramid = [torch.randn(batch, 4, b, b, generator=generator, dtype=dtype)
               for b in (1, 2, 3, 6)]
    weight = torch.randn(8, 32, 3, 3, generator=generator, dtype=dtype)
    bias = torch.randn(8, generator=generator, dtype=dtype)
    return x, pyramid, weight, bias


@pytest.mark.parametrize(("out_size", "in_size"), [(60, 6), (60, 1), (7, 3), (1, 1), (13, 13)])
def test_interpolation_matrix_is_bilinear_align_corners(out_size, in_size) -> None:
    signal = torch.randn(1, 1, 1, in_size, dtype=torch.float64)
    expected = F.interpolate(signal, size=(1, out_size), mode="bilinear", align_corners=True)
    matrix = interpolation_matrix(out_size, in_size, dtype=torch.float64, device="cpu")
    assert matrix.shape == (out_size, in_size)
    torch.testing.assert_close(matrix @ signal[0, 0, 0], expected[0, 0, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(out_size, dtype=torch.float64))


@pytest.mark.parametrize("boxes", [None, BOXES], ids=["whole", "boxes"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kernel", [3, 1])
def test_fast_equals_the_upsampled_concatenation(boxes, with_bias, kernel) -> None:
    """fp64: the same numbers to 1e-10, inside boxes and 0 outside them."""
    x, pyramid, weight, bias = _inputs()
    weight = weight[..., :kernel, :kernel].contiguous()
    bias = bias if with_bias else None
    norm = torch.nn.BatchNorm2d(8).double().eval()
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    fast = conv2d_over_pyramid(x, pyramid, weight, bias, boxes, after=norm, impl="fast")
    reference = conv2d_over_pyramid_reference(x, pyramid, weight, bias, boxes, after=norm)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-10)
    if boxes is not None:
        assert fast[3].abs().max() == 0  # the empty box
        assert fast[0, :, :2].abs().max() == 0 and fast[0, :, 2:9, 3:7].abs().min() > 0


def test_gradients_equal_the_reference() -> None:
    """The split form trains too (PSPNet base-class training runs it)."""
    grads = {}
    for impl in ("fast", "reference"):
        x, pyramid, weight, bias = (t.requires_grad_() if isinstance(t, torch.Tensor) else t
                                    for t in _inputs(batch=2))
        for p in pyramid:
            p.requires_grad_()
        out = conv2d_over_pyramid(x, pyramid, weight, bias, impl=impl)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads[impl] = [x.grad, weight.grad, bias.grad, *(p.grad for p in pyramid)]
    for fast, reference in zip(grads["fast"], grads["reference"], strict=True):
        torch.testing.assert_close(fast, reference, rtol=0, atol=1e-10)


def test_channel_split_must_match_the_weight() -> None:
    x, pyramid, weight, bias = _inputs()
    with pytest.raises(ValueError, match="weight reads 32 channels; x and the bins give 16"):
        conv2d_over_pyramid(x, pyramid[:2], weight, bias, impl="fast")


def test_pspnet_feat5_follows_the_switch() -> None:
    """PSPNet.feat5 and feat5_in_boxes: fast and reference agree (fp32, 1e-4), and the
    reference is the module's own upsample-concatenate-convolve."""
    torch.manual_seed(0)
    model = PSPNet("resnet_small", num_classes=5, strict_size=False).eval()
    layer4 = torch.randn(2, model.stage_channels[4], 17, 17)
    boxes = [(3, 11, 2, 9), (0, 17, 0, 17)]
    with torch.no_grad():
        expected = model.cls[1](model.cls[0](model.ppm(layer4)))
        with fast_paths(True):
            fast, fast_boxes = model.feat5(layer4), model.feat5_in_boxes(layer4, boxes)
        with fast_paths(False):
            reference = model.feat5(layer4)
    assert (fast - expected).abs().max() <= 1e-4 * expected.abs().max()
    torch.testing.assert_close(reference, expected, rtol=0, atol=0)
    torch.testing.assert_close(fast_boxes[1], fast[1], rtol=0, atol=1e-5)
    assert fast_boxes[0, :, :3].abs().max() == 0


EQUIVALENCE = r"""
import json, torch
from fss.ops.pyramid import conv2d_over_pyramid
torch.manual_seed(0)
x = torch.randn(2, 1024, 60, 60).contiguous(memory_format=torch.channels_last)
pyramid = [torch.randn(2, 256, b, b).relu() for b in (1, 2, 3, 6)]
weight = torch.randn(64, 2048, 3, 3) / 150
bias = torch.randn(64)
boxes = [(10, 40, 5, 50), (0, 60, 0, 60)]
errors = []
for b in (None, boxes):
    fast = conv2d_over_pyramid(x, pyramid, weight, bias, b, impl="fast")
    exact = conv2d_over_pyramid(x.double(), [p.double() for p in pyramid], weight.double(),
                                bias.double(), b, impl="reference")
    errors.append(float((fast.double() - exact).abs().max() / exact.abs().max()))
print(json.dumps({"errors": errors, "capability": torch.backends.cpu.get_cpu_capability()}))
"""


@pytest.mark.parametrize("caps", [False, True], ids=["no-caps", "avx2-caps"])
def test_matches_fp64_at_hdmnet_shapes_under_isa_caps(caps) -> None:
    """PSPNet's head at HDMNet's 60² map (half the R50 channels: 1024 + 4 x 256) in a new process, so
    that the ISA caps take effect: relative error to the fp64 reference <= 1e-5."""
    result = run_json_script(EQUIVALENCE, caps)
    if caps:
        assert result["capability"] in ("AVX2", "DEFAULT")
    assert max(result["errors"]) <= 1e-5, result["errors"]
