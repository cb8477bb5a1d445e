"""fss.ops.conv4d: the center-pivot 4D conv, GroupNorm over 6D and the 6D resizes, fast
against reference (fp32 to float rounding; bf16 against fp32 on bf16-rounded values)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fss.models.hsnet.conv4d import CenterPivotConv4d, GroupNorm6d
from fss.ops.conv4d import (
    SupportMatrixCache,
    center_pivot_conv4d,
    center_pivot_conv4d_reference,
    channels_last_6d,
    group_norm_6d,
    group_norm_6d_reference,
    is_channels_last_6d,
    resize_query_dims,
    support_matrix,
    windows_cover,
)
from fss.ops.correlation import BoxedCorrelation, hypercorrelation_pyramid

IMPLS = ("fast", "reference")


def _support_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1, 4, 5).contiguous().permute(0, 3, 1, 2, 4, 5)


def _weights(module: CenterPivotConv4d) -> tuple:
    return (module.conv1.weight, module.conv1.bias, module.conv2.weight, module.conv2.bias,
            module.support_stride)


def _reference(module: CenterPivotConv4d, x: torch.Tensor) -> torch.Tensor:
    return center_pivot_conv4d_reference(x, *_weights(module))


def test_reference_is_the_two_nn_conv2d_slices() -> None:
    """The reference is the paper's sum: conv1 over the query dims at the kept support
    positions, conv2 over the support dims at every query position, via nn.Conv2d."""
    torch.manual_seed(0)
    module = CenterPivotConv4d(3, 5, 3, 2)
    x = torch.randn(2, 3, 4, 5, 6, 5)
    n, c, ha, wa, hb, wb = x.shape
    query = module.conv1(x[..., ::2, ::2].permute(0, 4, 5, 1, 2, 3).reshape(-1, c, ha, wa))
    query = query.view(n, 3, 3, 5, ha, wa).permute(0, 3, 4, 5, 1, 2)
    support = module.conv2(x.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, hb, wb))
    support = support.view(n, ha, wa, 5, 3, 3).permute(0, 3, 1, 2, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(_reference(module, x), query + support)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["contiguous", "support_last", "channels_last"])
@pytest.mark.parametrize(("kernel", "stride", "size"),
                         [(5, 4, (6, 5, 13, 11)), (3, 2, (5, 6, 7, 6)), (3, 1, (6, 5, 2, 2))])
def test_center_pivot_conv_matches_reference(impl, layout, kernel, stride, size) -> None:
    torch.manual_seed(stride)
    module = CenterPivotConv4d(4, 8, kernel, stride)
    x = torch.randn(2, 4, *size)
    laid_out = {"contiguous": x, "support_last": _support_last(x),
                "channels_last": channels_last_6d(x)}[layout]
    laid_out = laid_out.detach().requires_grad_(True)
    reference_input = x.detach().requires_grad_(True)

    out = center_pivot_conv4d(laid_out, *_weights(module), impl=impl)
    expected = _reference(module, reference_input)
    assert is_channels_last_6d(out) == (impl == "fast")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    grad = torch.randn_like(expected)
    weight_grads = torch.autograd.grad(out, [laid_out, *module.parameters()], grad)
    reference_grads = torch.autograd.grad(expected, [reference_input, *module.parameters()], grad)
    for got, want in zip(weight_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_center_pivot_conv_without_autograd_matches_too() -> None:
    torch.manual_seed(1)
    module = CenterPivotConv4d(4, 16, 5, 4)
    x = torch.randn(1, 4, 9, 8, 13, 13)
    with torch.inference_mode():
        torch.testing.assert_close(module(_support_last(x)), _reference(module, x),
                                   rtol=1e-5, atol=1e-5)


def test_module_follows_the_switch() -> None:
    from fss.ops import fast_paths

    module = CenterPivotConv4d(2, 4, 3, 1)
    x = torch.randn(1, 2, 3, 3, 4, 4)
    with torch.no_grad():
        assert is_channels_last_6d(module(x))
        with fast_paths(False):
            out = module(x)
    assert out.is_contiguous() and not is_channels_last_6d(out)


@pytest.mark.parametrize(("kernel", "stride", "support"), [(3, 1, (2, 2)), (3, 2, (1, 2)),
                                                          (5, 1, (3, 3)), (3, 1, (1, 1))])
def test_small_support_maps_as_one_matrix_match_reference(kernel, stride, support) -> None:
    """Inference on support maps every window covers: the support slice as one cached
    matrix product, rebuilt when the weights change."""
    torch.manual_seed(kernel + stride)
    module = CenterPivotConv4d(8, 16, kernel, stride)
    assert windows_cover(*support, kernel, stride)
    x = torch.randn(3, 8, 6, 5, *support)
    with torch.no_grad():
        torch.testing.assert_close(module(channels_last_6d(x)), _reference(module, x),
                                   rtol=1e-5, atol=1e-5)
        cached = module.support_matrices.entry
        assert cached is not None
        module.conv2.weight.mul_(-2.0)
        torch.testing.assert_close(module(channels_last_6d(x)), _reference(module, x),
                                   rtol=1e-5, atol=1e-5)
        assert module.support_matrices.entry is not cached
    # Training after inference: the cached matrix has no graph, so it must not be reused.
    leaf = channels_last_6d(x).requires_grad_(True)
    grad = torch.randn(_reference(module, x).shape)
    got = torch.autograd.grad(module(leaf), [leaf, *module.parameters()], grad)
    reference_leaf = x.clone().requires_grad_(True)
    want = torch.autograd.grad(_reference(module, reference_leaf),
                               [reference_leaf, *module.parameters()], grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not windows_cover(4, 4, 3, 2)  # squeeze: windows differ


@pytest.mark.parametrize(("kernel", "stride", "size"),
                         [(3, 1, (2, 2)), (3, 2, (1, 2)), (5, 1, (3, 3)), (3, 2, (4, 5)),
                          (5, 4, (6, 7)), (3, 1, (1, 1))])
def test_support_matrix_is_the_convolution_of_the_one_hot_basis(kernel, stride, size) -> None:
    """Row i of the matrix is the (channels-last, flattened) convolution of the i-th
    one-hot map, for any map size, kernel and stride, covering or not; gradients too."""
    torch.manual_seed(kernel * stride)
    weight = torch.randn(4, 3, kernel, kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64)
    hb, wb = size
    matrix, repeated_bias = support_matrix(weight, bias, hb, wb, stride, torch.float64)
    basis = torch.eye(hb * wb * 3, dtype=torch.float64).view(-1, hb, wb, 3).permute(0, 3, 1, 2)
    images = F.conv2d(basis, weight, None, stride, kernel // 2)
    expected = images.permute(0, 2, 3, 1).reshape(hb * wb * 3, -1)
    assert torch.equal(matrix, expected)
    assert torch.equal(repeated_bias, bias.repeat(images.shape[-2] * images.shape[-1]))
    grad = torch.randn_like(matrix)
    torch.testing.assert_close(torch.autograd.grad(matrix, weight, grad)[0],
                               torch.autograd.grad(expected, weight, grad)[0],
                               rtol=1e-12, atol=1e-12)


def test_support_matrix_cache_works_without_a_module() -> None:
    torch.manual_seed(2)
    weight, bias = torch.randn(4, 3, 3, 3), torch.randn(4)
    cache = SupportMatrixCache()
    with torch.no_grad():
        first = cache.get(weight, bias, 2, 2, 1, torch.float32)
        assert cache.get(weight, bias, 2, 2, 1, torch.float32) is first
        assert cache.get(weight, bias, 2, 2, 1, torch.float64) is not first


# Support boxes (top, bottom, left, right) on a 13x11 support map, one per pair: interior,
# touching every border, a single position, a full-width band, and an empty support.
_BOXES = [(3, 9, 2, 7), (0, 13, 0, 4), (12, 13, 10, 11), (5, 6, 0, 11), (0, 0, 0, 0)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("kernel", "stride"), [(5, 4), (3, 2), (3, 1), (5, 2)])
def test_boxed_correlation_conv_matches_dense(impl, kernel, stride, monkeypatch) -> None:
    """The first 4D conv on a level kept as support boxes equals the conv of the dense
    level: bias where no window reaches the box, the convolution elsewhere."""
    monkeypatch.setattr("fss.ops.correlation.BOXED_MIN_POSITIONS", 0)  # a small level
    torch.manual_seed(kernel * 10 + stride)
    hb, wb = 13, 11
    shots = len(_BOXES)
    query = [torch.randn(1, 6, 20, 21) for _ in range(3)]  # >= 400: products as 1x1 convs
    support = [torch.randn(shots, 6, hb, wb) for _ in range(3)]
    for pair, (top, bottom, left, right) in enumerate(_BOXES):
        keep = torch.zeros(hb, wb)
        keep[top:bottom, left:right] = 1
        for feature in support:
            feature[pair] *= keep
    module = CenterPivotConv4d(3, 8, kernel, stride)
    with torch.no_grad():
        dense = hypercorrelation_pyramid(query, support, [2, 2, 2], impl="reference")[0]
        boxed = hypercorrelation_pyramid(query, support, [2, 2, 2], boxed=True,
                                         impl="fast_cpu")[0]
        assert isinstance(boxed, BoxedCorrelation)
        assert boxed.boxes == tuple(_BOXES) and boxed.values[-1] is None
        torch.testing.assert_close(boxed.to_dense(), dense, rtol=1e-5, atol=1e-6)
        got = center_pivot_conv4d(boxed, *_weights(module), impl=impl)
        expected = _reference(module, dense)
    assert is_channels_last_6d(got) == (impl == "fast")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The empty support sees only zeros: both branches give their bias.
    bias = (module.conv1.bias + module.conv2.bias).detach()
    torch.testing.assert_close(got[-1], bias.view(-1, 1, 1, 1, 1).expand_as(got[-1]))
    # Training reads the boxes too: the weights' and biases' gradients equal the dense
    # level's (all four, through a loss that weighs every output position differently).
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(center_pivot_conv4d(boxed, *_weights(module), impl=impl),
                              list(module.parameters()), grad)
    want = torch.autograd.grad(_reference(module, dense), list(module.parameters()), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("inplace", [True, False])
def test_groupnorm6d_inference_in_chunks_and_in_place(impl, inplace) -> None:
    """Without autograd the fast statistics run in chunks (more positions than one chunk
    here) and ``inplace`` writes over the input; the values are nn.GroupNorm's either way."""
    torch.manual_seed(7)
    norm = GroupNorm6d(4, 8, inplace=inplace)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(3, 8, 30, 30, 5, 4) * 2 + 1  # 18,000 positions: 3 chunks of <= 8192
    expected = F.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    laid_out = channels_last_6d(x)
    before = laid_out.clone()
    with torch.no_grad():
        out = group_norm_6d(laid_out, 4, norm.weight, norm.bias, norm.eps, inplace=inplace,
                            impl=impl)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out.data_ptr() == laid_out.data_ptr()) == (inplace and impl == "fast")
    if not (inplace and impl == "fast"):
        assert torch.equal(laid_out, before)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("channels_last", [True, False])
def test_groupnorm6d_matches_groupnorm(impl, channels_last) -> None:
    torch.manual_seed(2)
    norm = GroupNorm6d(4, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(2, 16, 5, 4, 3, 3) * 3 + 2).requires_grad_(True)
    laid_out = channels_last_6d(x) if channels_last else x
    out = group_norm_6d(laid_out, 4, norm.weight, norm.bias, norm.eps, impl=impl)
    expected = group_norm_6d_reference(x, 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(expected, F.group_norm(x, 4, norm.weight, norm.bias, norm.eps))
    assert is_channels_last_6d(out) == (channels_last and impl == "fast")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, [x, norm.weight, norm.bias], grad)
    want = torch.autograd.grad(expected, [x, norm.weight, norm.bias], grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_resize_query_dims_matches_per_position_interpolation(impl, channels_last) -> None:
    x = torch.randn(2, 3, 4, 5, 2, 3)
    out = resize_query_dims(channels_last_6d(x) if channels_last else x, (7, 9), impl=impl)
    assert out.shape == (2, 3, 7, 9, 2, 3)
    assert is_channels_last_6d(out) == (channels_last and impl == "fast")
    for i in range(2):
        for j in range(3):
            expected = F.interpolate(x[..., i, j], size=(7, 9), mode="bilinear",
                                     align_corners=True)
            torch.testing.assert_close(out[..., i, j], expected)


@pytest.mark.parametrize(("support_size", "stride"), [(1, 2), (2, 4), (3, 4), (4, 2)])
def test_center_pivot_conv_bf16_weight_gradients_when_stride_exceeds_the_map(
    support_size: int, stride: int
) -> None:
    """PyTorch's CPU bf16 conv gives NaN/inf or wrong weight gradients in most calls when
    the stride exceeds the input (the deepest support level, strided to 1x1): the 4D conv
    must not hand it such a call. Compared with fp32 on the same bf16-rounded values."""
    torch.manual_seed(0)
    conv = CenterPivotConv4d(4, 8, 3, support_stride=stride)
    for _ in range(8):
        x = torch.randn(2, 4, 3, 3, support_size, support_size)
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        grad_out = torch.randn(out.shape)
        (out.float() * grad_out).sum().backward()
        bf16_grads = [p.grad.clone() for p in conv.parameters()]
        reference = CenterPivotConv4d(4, 8, 3, support_stride=stride)
        with torch.no_grad():
            for mine, theirs in zip(reference.parameters(), conv.parameters(), strict=True):
                mine.copy_(theirs.bfloat16().float())
        (reference(x.bfloat16().float()) * grad_out).sum().backward()
        for got, want in zip(bf16_grads, (p.grad for p in reference.parameters()), strict=True):
            assert torch.isfinite(got).all()
            assert (got - want).abs().max() <= 0.05 * want.abs().max() + 1e-3


def test_unknown_impl_is_refused() -> None:
    module = CenterPivotConv4d(2, 4, 3, 1)
    with pytest.raises(ValueError, match="impl='fast_cpu'.*accepted: fast, reference"):
        center_pivot_conv4d(torch.randn(1, 2, 3, 3, 3, 3), *_weights(module), impl="fast_cpu")


def _backward_nodes(output: torch.Tensor) -> set:
    """Every node of ``output``'s backward graph."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return seen


def _copy_slices_nodes(output: torch.Tensor) -> int:
    """Backward nodes that copy a whole gradient back through a view (in-place op on a
    view of a tensor in the graph)."""
    return sum(type(node).__name__ == "CopySlices" for node in _backward_nodes(output))


def test_learner_blocks_train_without_copying_gradients_through_views() -> None:
    """A squeezing block on a support-last level (the correlation) under autograd: no
    in-place op on a view enters the graph (the conv's add and the ReLU run out of place),
    the result equals the reference block, and the same block still writes in place
    without autograd."""
    from fss.models.hsnet.learner import SQUEEZE_L3, conv4d_block

    torch.manual_seed(3)
    block = conv4d_block(3, SQUEEZE_L3).double()
    x = _support_last(torch.rand(2, 3, 9, 8, 13, 13, dtype=torch.float64))
    out = block(x)
    assert _copy_slices_nodes(out) == 0
    from fss.ops import fast_paths

    with fast_paths(False):
        expected = block(x.contiguous())
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.square().sum(), list(block.parameters()))
    want = torch.autograd.grad(expected.square().sum(), list(block.parameters()))
    for got, reference in zip(grads, want, strict=True):
        torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-9)
    # Without autograd the ReLU rectifies the norm's output in place.
    relu = block[2]
    y = channels_last_6d(torch.randn(1, 2, 3, 3, 2, 2))
    with torch.no_grad():
        assert relu(y).data_ptr() == y.data_ptr() and y.min() >= 0
    leaf = torch.randn(4, requires_grad=True)
    assert relu(leaf).data_ptr() != leaf.data_ptr()


@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm6d_hand_written_backward_matches_autograd(affine) -> None:
    """The fast path's backward against autograd through F.group_norm in fp64, over more
    positions than one statistics chunk, and for every subset of inputs that need a
    gradient; gradcheck on a small case."""
    torch.manual_seed(11)
    norm = GroupNorm6d(4, 8, affine=affine).double()
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 8, 30, 30, 4, 4, dtype=torch.float64) * 2 + 1  # 14,400 positions
    grad = torch.randn_like(x)
    params = list(norm.parameters())
    for x_needs_grad in (True, False):
        leaf = x.clone().requires_grad_(x_needs_grad)
        inputs = ([leaf] if x_needs_grad else []) + params
        if not inputs:
            continue
        out = norm(channels_last_6d(leaf))
        assert is_channels_last_6d(out)
        got = torch.autograd.grad(out, inputs, grad)
        expected = F.group_norm(leaf, 4, norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        want = torch.autograd.grad(expected, inputs, grad)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    small = torch.randn(2, 8, 3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: norm(channels_last_6d(t)), (small,))


@pytest.mark.parametrize(("kernel", "stride", "support"),
                         [(5, 4, (13, 11)), (3, 2, (4, 4)), (3, 2, (7, 1)), (3, 1, (5, 4))])
def test_level_gradient_from_one_node_equals_the_two_node_graph(kernel, stride, support,
                                                                monkeypatch) -> None:
    """Under autograd the support branch and the query branch's pivot gather are one node:
    the pivot maps' gradient is added in place at the pivots of the support branch's input
    gradient, instead of autograd's zero-filled level-sized tensor and a second sum. Each
    sum keeps its two terms, so every gradient equals the two-node graph's bit for bit."""
    import fss.ops.conv4d as conv4d_ops

    torch.manual_seed(kernel + stride)
    module = CenterPivotConv4d(6, 12, kernel, stride)
    x = channels_last_6d(torch.randn(2, 6, 5, 4, *support))
    results = {}
    for one_node in (True, False):
        if not one_node:
            monkeypatch.setattr(conv4d_ops, "_one_backward_node", lambda *args: False)
        level = x.detach().requires_grad_(True)
        out = center_pivot_conv4d(level, *_weights(module), impl="fast")
        names = {type(node).__name__ for node in _backward_nodes(out)}
        grads = torch.autograd.grad(out, [level, *module.parameters()],
                                    torch.linspace(-1, 1, out.numel()).view(out.shape))
        results[one_node] = (names, out, grads)
    assert "_SupportBranchAndPivotsBackward" in results[True][0]
    assert "_SupportBranchAndPivotsBackward" not in results[False][0]
    assert torch.equal(results[True][1], results[False][1])
    for got, want in zip(results[True][2], results[False][2], strict=True):
        assert got.shape == want.shape and torch.equal(got, want)
    assert results[True][2][0].abs().sum() > 0
