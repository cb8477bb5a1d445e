"""Official HDMNet / BAM training augmentations (fss.data.augment) on tiny numpy images."""

from __future__ import annotations

import numpy as np
import pytest

from fss.data.augment import (
    MEAN_RGB,
    Compose,
    RandomCrop,
    RandomGaussianBlur,
    RandomHorizontalFlip,
    RandRotate,
    RandScale,
    Resize,
    base_learner_train_augmentation,
    gaussian_blur,
    gaussian_kernel,
    hdmnet_train_augmentation,
)


def pair(height=40, width=56, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    label = np.zeros((height, width), dtype=np.uint8)
    label[10:30, 15:40] = 3
    label[10, 15:40] = 255
    return image, label


def test_hdmnet_chain_shapes_dtypes_and_label_values():
    image, label = pair()
    augment = hdmnet_train_augmentation(size=33)
    for seed in range(8):
        out_image, out_label = augment(image, label, np.random.default_rng(seed))
        assert out_image.shape == (33, 33, 3) and out_image.dtype == np.uint8
        assert out_label.shape == (33, 33) and out_label.dtype == np.uint8
        # Nearest-neighbour labels: no interpolated values ever appear.
        assert set(np.unique(out_label)) <= {0, 3, 255}
        assert out_image.flags.c_contiguous and out_label.flags.c_contiguous


def test_same_seed_same_result_other_seed_differs():
    image, label = pair()
    augment = hdmnet_train_augmentation(size=41)
    first = augment(image, label, np.random.default_rng(7))
    second = augment(image, label, np.random.default_rng(7))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    others = [augment(image, label, np.random.default_rng(s)) for s in range(8, 14)]
    assert any(not np.array_equal(first[0], o[0]) for o in others)


def test_rotation_pads_label_with_255_and_image_with_mean():
    image = np.full((48, 48, 3), 7, dtype=np.uint8)
    label = np.zeros((48, 48), dtype=np.uint8)
    rotate = RandRotate((10.0, 10.0), p=1.0)
    out_image, out_label = rotate(image, label, np.random.default_rng(0))
    padded = out_label == 255
    assert padded[0, 0] and padded[-1, -1] and padded.sum() > 20  # the corners
    assert not padded[24, 24]
    np.testing.assert_array_equal(out_image[0, 0], MEAN_RGB)
    assert (out_image[24, 24] == 7).all()
    # p = 0: never rotated.
    untouched = RandRotate((10.0, 10.0), p=0.0)(image, label, np.random.default_rng(0))
    assert (untouched[1] == 0).all()


def test_rotation_probability_is_about_one_half():
    image, label = pair(24, 24)
    rotate = RandRotate((5.0, 10.0), p=0.5)
    rotated = sum(
        bool((rotate(image, label, np.random.default_rng(s))[1] == 255).sum() > 24)
        for s in range(200)
    )
    assert 70 < rotated < 130


def test_scale_range_and_resize():
    image, label = pair(40, 60)
    for seed in range(10):
        out_image, out_label = RandScale((0.9, 1.1))(image, label, np.random.default_rng(seed))
        assert 36 <= out_image.shape[0] <= 44 and 54 <= out_image.shape[1] <= 66
        assert out_label.shape == out_image.shape[:2]
    out_image, out_label = Resize((17, 25))(image, label)
    assert out_image.shape == (17, 25, 3) and out_label.shape == (17, 25)
    with pytest.raises(ValueError, match="0 < low <= high"):
        RandScale((1.2, 0.8))


def test_gaussian_blur_kernel_and_effect():
    kernel = gaussian_kernel(5)
    assert kernel.shape == (5,) and kernel.sum() == pytest.approx(1.0)
    # cv2.GaussianBlur(image, (5, 5), 0) uses the binomial kernel [1, 4, 6, 4, 1] / 16.
    np.testing.assert_allclose(kernel, np.array([1, 4, 6, 4, 1]) / 16)
    assert gaussian_kernel(9).sum() == pytest.approx(1.0)
    flat = np.full((9, 9, 3), 100, dtype=np.uint8)
    np.testing.assert_array_equal(gaussian_blur(flat), flat)  # constant stays constant
    spike = np.zeros((9, 9, 3), dtype=np.uint8)
    spike[4, 4] = 255
    blurred = gaussian_blur(spike)
    assert blurred[4, 4, 0] < 255 and blurred[4, 6, 0] > 0 and blurred[0, 0, 0] == 0
    image, label = pair()
    always = RandomGaussianBlur(p=1.0)(image, label, np.random.default_rng(0))
    assert always[1] is label and not np.array_equal(always[0], image)


def test_flip_mirrors_image_and_label_together():
    image, label = pair()
    out_image, out_label = RandomHorizontalFlip(p=1.0)(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(out_image, image[:, ::-1])
    np.testing.assert_array_equal(out_label, label[:, ::-1])


def test_random_crop_pads_small_images():
    image, label = pair(20, 30)
    out_image, out_label = RandomCrop(25)(image, label, np.random.default_rng(0))
    assert out_image.shape == (25, 25, 3) and out_label.shape == (25, 25)
    # 5 rows of padding in total: they hold 255 / the mean colour.
    assert (out_label == 255).sum() >= 25 * 2
    chain = base_learner_train_augmentation(crop=31)
    out_image, out_label = chain(image, label, np.random.default_rng(3))
    assert out_image.shape == (31, 31, 3) and set(np.unique(out_label)) <= {0, 3, 255}


def test_inputs_are_checked():
    image, label = pair()
    augment = Compose([Resize(8)])
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\) image"):
        augment(image.astype(np.float32), label, np.random.default_rng(0))
    with pytest.raises(ValueError, match="label matching the image"):
        augment(image, label[:-1], np.random.default_rng(0))
