import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from semhitok.eval.fid import FIDUnavailable, GaussianStats, InceptionFeatures, frechet_distance
from semhitok.tokenizer.metrics import psnr, ssim
from tests.tokenizer.test_model import sample_images


def test_psnr_and_ssim_match_scikit_image():
    target = sample_images(2, 96)
    noisy = (target + 0.1 * torch.randn_like(target)).clamp(-1, 1)
    a = ((noisy + 1) / 2).permute(0, 2, 3, 1).numpy().astype(np.float64)
    b = ((target + 1) / 2).permute(0, 2, 3, 1).numpy().astype(np.float64)
    ref_psnr = np.mean([peak_signal_noise_ratio(b[i], a[i], data_range=1.0) for i in range(2)])
    ref_ssim = np.mean([
        structural_similarity(b[i], a[i], data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False)
        for i in range(2)
    ])
    assert float(psnr(noisy, target)) == pytest.approx(ref_psnr, abs=1e-3)
    assert float(ssim(noisy, target)) == pytest.approx(ref_ssim, abs=2e-3)
    assert float(ssim(target, target)) == pytest.approx(1.0, abs=1e-5)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-6)


def test_streaming_stats_equal_numpy_mean_and_covariance():
    feats = np.random.default_rng(1).normal(size=(300, 6))
    stats = GaussianStats(6)
    for chunk in np.array_split(feats, 7):
        stats.update(chunk)
    mu, cov = stats.mean_cov()
    assert np.allclose(mu, feats.mean(0)) and np.allclose(cov, np.cov(feats, rowvar=False))


def test_fid_without_inception_weights_says_what_to_install():
    try:
        InceptionFeatures(torch.device("cpu"))
    except FIDUnavailable as err:
        assert "pytorch-fid" in str(err) and "pt_inception-2015-12-05" in str(err) and "\n" not in str(err)
    else:
        pytest.skip("pytorch-fid and its weights are installed here: the offline message cannot be observed")
