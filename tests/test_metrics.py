"""SSIM, PSNR (kornia) and the Fréchet distance: closed forms, conventions, refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastguidance.errors import InvalidInputError
from fastguidance.metrics import PSNR_CAP_DB, compare_images, format_psnr, mean_psnr, pair_batches, psnr, ssim
from fastguidance.research.statistics import (FrechetBootstrap, basic_interval, bootstrap_indices, bootstrap_means,
                                              frechet_distance, percentile_interval, prompts_to_resolve)


def images(batch=2, channels=3, size=24, seed=0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def noisy(x: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


# --------------------------------------------------------------------------------------------------
# SSIM


def reference_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Wang et al. 2004 eq. 13 written out: 11×11 Gaussian (σ 1.5), valid window, mean per image."""
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-coords**2 / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(a.shape[1], 1, 11, 11)
    a, b = a.double(), b.double()

    def blur(x):
        return F.conv2d(x, window, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(dim=1)


def test_ssim_is_one_for_identical_images_per_image_fp32():
    x = images(batch=3)
    values = ssim(x, x.clone())
    assert values.shape == (3,) and values.dtype == torch.float32
    assert torch.allclose(values, torch.ones(3), atol=1e-6)
    flat = torch.zeros(1, 3, 16, 16)  # no epsilon in the denominator: flat black images also score 1
    assert float(ssim(flat, flat)[0]) == pytest.approx(1.0, abs=1e-6)


def test_ssim_matches_the_paper_formula_with_a_valid_11x11_gaussian_window():
    a = images(batch=2, size=20)
    b = noisy(a, 0.1)
    assert torch.allclose(ssim(a, b).double(), reference_ssim(a, b), atol=1e-5)


def test_ssim_is_per_image_and_falls_with_noise():
    a = images(batch=3)
    b = torch.stack([a[0], noisy(a[1:2], 0.05)[0], noisy(a[2:3], 0.3)[0]])
    values = ssim(a, b)
    assert values[0] == pytest.approx(1.0, abs=1e-6)
    assert 1.0 > float(values[1]) > float(values[2])
    assert torch.allclose(ssim(a[1:2], b[1:2]), values[1:2])  # a pair's value does not depend on its batch


def test_half_precision_inputs_give_fp32_values_and_inputs_are_untouched():
    a, b = images(), noisy(images(), 0.1)
    a_half, b_half = a.half(), b.half()
    before = b_half.clone()
    assert ssim(a_half, b_half).dtype == torch.float32 and psnr(a_half, b_half).dtype == torch.float32
    assert torch.equal(b_half, before)


# --------------------------------------------------------------------------------------------------
# PSNR


def test_psnr_closed_form_and_infinity_for_identical_images():
    a = images(batch=2) * 0.8
    b = a + 0.1  # MSE 0.01 everywhere -> 20 dB
    b[1] = a[1]
    values = psnr(a, b)
    assert values.dtype == torch.float32 and values.shape == (2,)
    assert float(values[0]) == pytest.approx(20.0, abs=1e-3)
    assert values[1] == math.inf


def test_psnr_is_per_image_not_pooled():
    a = images(batch=2) * 0.5
    b = a.clone()
    b[0] += 0.1  # 20 dB
    b[1] += 0.01  # 40 dB
    assert psnr(a, b).tolist() == pytest.approx([20.0, 40.0], abs=1e-2)


def test_mean_psnr_caps_infinity_and_format():
    values = torch.tensor([30.0, math.inf])
    assert mean_psnr(values) == pytest.approx((30.0 + PSNR_CAP_DB) / 2)
    assert mean_psnr(values, cap_db=None) == math.inf
    assert mean_psnr(torch.tensor([31.25, 32.75])) == pytest.approx(32.0)
    assert math.isnan(mean_psnr(torch.tensor([])))
    assert format_psnr(31.24) == "31.2 dB" and format_psnr(math.inf) == "inf dB (identical)"


# --------------------------------------------------------------------------------------------------
# compare_images: broadcasting and the summary


def test_compare_images_pairwise_broadcast_and_summary():
    a = images(batch=2)
    same = compare_images(a, a)
    assert same.count == 2 and same.identical == 2
    assert same.mean_ssim == pytest.approx(1.0, abs=1e-6) and same.mean_psnr() == PSNR_CAP_DB
    assert same.summary() == "SSIM 1.000 · PSNR inf dB (identical) over 2 images"

    b = noisy(a, 0.1)
    one_to_many = compare_images(a[:1], b)
    assert one_to_many.count == 2
    assert torch.allclose(one_to_many.ssim, ssim(a[:1].expand(2, -1, -1, -1), b))
    assert torch.allclose(compare_images(b, a[:1]).psnr, one_to_many.psnr)  # symmetric

    mixed = compare_images(a, torch.stack([a[0], b[1]]))
    assert mixed.identical == 1
    text = mixed.summary()
    assert text.startswith("SSIM ") and "over 2 images (1 identical, counted as 100 dB)" in text
    single = compare_images(a[:1], b[:1]).summary()
    assert single.endswith("dB over 1 image") and "inf" not in single


def test_pair_batches_expands_without_copying():
    a, b = images(batch=1), images(batch=3, seed=1)
    pa, pb = pair_batches(a, b)
    assert pa.shape == pb.shape == (3, 3, 24, 24) and pa.data_ptr() == a.data_ptr()


@pytest.mark.parametrize("shape_b, name, fragment", [
    ((3, 3, 24, 24), "image_b", "image_a has 2 images"),        # batches 2 vs 3
    ((2, 3, 24, 20), "image_b", "24×24 pixels"),                # sizes differ
    ((2, 1, 24, 24), "image_b", "3 channels"),                  # channels differ
])
def test_compare_images_refuses_incompatible_batches_naming_the_inputs(shape_b, name, fragment):
    with pytest.raises(InvalidInputError) as error:
        compare_images(images(batch=2), torch.rand(shape_b), names=("image_a", "image_b"))
    assert error.value.input_name == name and fragment in str(error.value)


def test_ssim_and_psnr_refuse_bad_inputs_naming_the_argument():
    good = images()
    cases = [
        ((good, good[:1]), "b", "batch"),
        ((good.flatten(2), good), "a", "[B, C, H, W]"),
        ((good, good * 2), "b", "values in"),
        ((good, torch.full_like(good, float("nan"))), "b", "non-finite"),
        ((torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)), "a", "11×11"),
        ((good, (good * 255).to(torch.uint8)), "b", "floating-point"),
        (([1.0], good), "a", "torch.Tensor"),
    ]
    for metric in (ssim, psnr):
        for (a, b), name, fragment in cases:
            with pytest.raises(InvalidInputError) as error:
                metric(a, b)
            assert error.value.input_name == name and fragment in str(error.value), (metric.__name__, str(error.value))


def test_values_slightly_outside_the_range_are_accepted_and_clamped():
    a = images()
    assert torch.isfinite(psnr(a, (a + 5e-4).clamp(max=1.0005))).all()


# --------------------------------------------------------------------------------------------------
# Fréchet distance


def exact_gaussian_sample(n: int, mean: torch.Tensor, std: torch.Tensor, seed: int) -> torch.Tensor:
    """n samples whose sample mean is ``mean`` and unbiased covariance is ``diag(std²)``, exactly."""
    z = torch.randn(n, mean.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(dim=0)
    cov = z.T @ z / (n - 1)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(cov)).T  # whitened: sample covariance = I
    return mean + z * std


def test_frechet_distance_matches_the_diagonal_closed_form():
    mean_a, std_a = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    mean_b, std_b = torch.tensor([1.0, 1.0, 0.0, -0.5], dtype=torch.float64), torch.tensor([2.0, 0.5, 0.5, 1.0], dtype=torch.float64)
    a = exact_gaussian_sample(200, mean_a, std_a, seed=0)
    b = exact_gaussian_sample(300, mean_b, std_b, seed=1)
    # for diagonal covariances: FD = Σ(μ1 − μ2)² + Σ(σ1 − σ2)²
    expected = float(((mean_a - mean_b) ** 2).sum() + ((std_a - std_b) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a.float(), b.float()) == pytest.approx(expected, rel=1e-4)  # fp32 features


def test_frechet_distance_of_a_set_with_itself_is_zero_and_a_shift_gives_its_square():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    shift = torch.arange(16, dtype=torch.float64) / 10
    assert frechet_distance(x, x + shift) == pytest.approx(float((shift**2).sum()), rel=1e-9)


def test_frechet_distance_is_symmetric_with_rank_deficient_covariances():
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(10, 32, generator=generator)  # N < D: singular covariances
    b = torch.randn(12, 32, generator=generator) * 2 + 1
    forward, backward = frechet_distance(a, b), frechet_distance(b, a)
    assert math.isfinite(forward) and forward > 0
    assert forward == pytest.approx(backward, rel=1e-8)


def test_frechet_distance_refuses_bad_features():
    good = torch.randn(8, 4)
    for args, name in [((good[:1], good), "features_a"), ((good, good[:, :3]), "features_b"),
                       ((good.flatten(), good), "features_a"), ((good, good * float("nan")), "features_b")]:
        with pytest.raises(InvalidInputError) as error:
            frechet_distance(*args)
        assert error.value.input_name == name


# --------------------------------------------------------------------------------------------------
# Paired bootstrap


def test_bootstrap_indices_are_seeded_and_in_range():
    first, again, other = bootstrap_indices(50, 200, seed=7), bootstrap_indices(50, 200, seed=7), bootstrap_indices(50, 200, 8)
    assert first.shape == (200, 50) and torch.equal(first, again) and not torch.equal(first, other)
    assert int(first.min()) >= 0 and int(first.max()) == 49
    with pytest.raises(InvalidInputError):
        bootstrap_indices(0, 10, seed=0)


def test_percentile_interval_of_known_values():
    assert percentile_interval(torch.arange(101.0)) == pytest.approx([2.5, 97.5])
    assert percentile_interval(torch.arange(101.0), level=0.5) == pytest.approx([25.0, 75.0])
    with pytest.raises(InvalidInputError):
        percentile_interval(torch.arange(5.0), level=1.0)
    # the basic interval reflects the percentiles about the estimate: a shift of the resamples moves it the other way
    assert basic_interval(torch.arange(101.0), 50.0) == pytest.approx([2.5, 97.5])
    assert basic_interval(torch.arange(101.0) + 10.0, 50.0) == pytest.approx([-7.5, 87.5])


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation():
    # 0/1 scores with p = 0.7 on 400 prompts: the 95% interval is about p ± 1.96·√(p(1−p)/N) = ±0.045
    values = (torch.rand(400, generator=torch.Generator().manual_seed(1)) < 0.7).double()
    low, high = percentile_interval(bootstrap_means(values, bootstrap_indices(400, 4000, seed=0)))
    p = float(values.mean())
    half = 1.96 * math.sqrt(p * (1 - p) / 400)
    assert low < p < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)


def test_paired_differences_cancel_what_the_rows_share():
    # two rows that differ by exactly 0.05 on every prompt: the paired interval of the difference is that
    # value exactly, although each row's own interval is wide
    scores = torch.rand(96, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    indices = bootstrap_indices(96, 500, seed=0)
    a, b = bootstrap_means(scores + 0.05, indices), bootstrap_means(scores, indices)
    assert percentile_interval(a - b) == pytest.approx([0.05, 0.05], abs=1e-12)
    low, high = percentile_interval(a)
    assert high - low > 0.05


def test_prompts_to_resolve_scales_with_the_square_of_the_half_width():
    assert prompts_to_resolve(0.04, 96, 0.02) == 384
    assert prompts_to_resolve(0.01, 96, 0.02) == 24
    with pytest.raises(InvalidInputError):
        prompts_to_resolve(0.04, 96, 0.0)


def test_frechet_bootstrap_equals_the_distance_of_each_resampled_set():
    generator = torch.Generator().manual_seed(3)
    reference = torch.randn(40, 6, generator=generator)
    features = 0.5 * torch.randn(40, 6, generator=generator) + 0.3
    indices = bootstrap_indices(40, 12, seed=0)
    distances = FrechetBootstrap(reference, indices).distances(features)
    expected = torch.tensor([frechet_distance(features[row], reference[row]) for row in indices], dtype=torch.float64)
    assert torch.allclose(distances, expected, rtol=1e-9, atol=1e-9)
    assert float(FrechetBootstrap(reference, indices).distances(reference).abs().max()) < 1e-9
    with pytest.raises(InvalidInputError):
        FrechetBootstrap(reference, indices).distances(features[:, :5])
