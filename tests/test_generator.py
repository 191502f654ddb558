"""SparseGenerator / EnergyCritic: Table 1 architecture, sparsity, dense baseline, hooks, config checks."""
import pytest
import sparsegen_kernels as sk
import torch
from sparsegen_kernels.reference import topk_mask_ref

from sparsegen import EnergyCritic, MODEL_CONFIGS, ModelConfig, SparseGenerator, critic_loss


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_paper64_is_table1():
    g = SparseGenerator("paper64")
    s = shapes(g)
    assert g.z_dim == 100 and g.image_shape == (3, 64, 64)
    assert s["fc.weight"] == (4 * 4 * 3200, 100)
    # [up x2, conv, conv] blocks of 512, 256, 128 channels, then up, conv 64, conv 64, conv 3 (all 3x3)
    expected = {
        "blocks.0.up.weight": (512, 3200, 3, 3), "blocks.0.conv.weight": (512, 512, 3, 3),
        "blocks.1.up.weight": (256, 512, 3, 3), "blocks.1.conv.weight": (256, 256, 3, 3),
        "blocks.2.up.weight": (128, 256, 3, 3), "blocks.2.conv.weight": (128, 128, 3, 3),
        "final.up.weight": (64, 128, 3, 3), "final.conv.weight": (64, 64, 3, 3), "out.weight": (3, 64, 3, 3),
    }
    for k, v in expected.items():
        assert s[k] == v, k
    # FC: channel top-8 of 3200 at 4x4; blocks: spatial top-k = HW / 4 at 8x8, 16x16, 32x32
    assert dict(g.layer_topk) == {"fc": (8, "channel"), "block1": (16, "spatial"), "block2": (64, "spatial"),
                                  "block3": (256, "spatial")}
    assert dict(g.layer_shapes) == {"fc": (3200, 4, 4), "block1": (512, 8, 8), "block2": (256, 16, 16),
                                    "block3": (128, 32, 32)}
    # the upsample + conv after every top-k is the kernels' sparse module
    assert all(isinstance(b.up, sk.SparseUpsampleConv2d) for b in list(g.blocks) + [g.final])
    y, acts = g(torch.randn(1, 100), return_activations=True)
    assert y.shape == (1, 3, 64, 64) and y.abs().max() <= 1
    assert [a.k for a in acts.values()] == [8, 16, 64, 256]
    assert [a.mode for a in acts.values()] == ["channel", "spatial", "spatial", "spatial"]


def test_paper64_critic_is_table1_right_column():
    c = EnergyCritic("paper64")
    s = shapes(c)
    assert s["stem.weight"] == (64, 3, 3, 3)
    chans = [(64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (512, 256), (512, 512)]
    got = [s[f"stages.{i}.{j}.weight"][:2] for i in range(4) for j in range(2)]
    assert got == [(64, 64)] + chans
    assert s["fc.weight"] == (1, 512 * 4 * 4)
    assert c(torch.randn(2, 3, 64, 64)).shape == (2,)


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_every_config_builds_and_runs(name):
    cfg = MODEL_CONFIGS[name]
    for sparse in (True, False):
        g = SparseGenerator(name, sparse=sparse)
        y, acts = g(torch.randn(2, cfg.z_dim), return_activations=True)
        assert y.shape == (2,) + cfg.image_shape
        assert list(acts) == g.layer_names
        kind = sk.SparseActivation if sparse else torch.Tensor
        assert all(isinstance(a, kind) for a in acts.values())
    if name != "paper64":
        assert EnergyCritic(name)(y).shape == (2,)


def test_sparse_activations_obey_their_topk():
    torch.manual_seed(0)
    g = SparseGenerator("cpu32")
    _, acts = g(torch.randn(3, 32), return_activations=True)
    for name, a in acts.items():
        k, mode = g.layer_topk[name]
        assert a.mode == mode and a.values.shape[-1] == k
        dense = a.to_dense()
        assert dense.shape[1:] == g.layer_shapes[name]
        assert (dense >= 0).all()  # ReLU before the selection
        nz = (dense != 0).float()
        per_group = {"spatial": nz.flatten(2).sum(2), "channel": nz.sum(1), "global": nz.flatten(1).sum(1)}[mode]
        assert (per_group <= k).all()


def test_aaai_uses_global_topk_and_transposed_convs():
    g = SparseGenerator("aaai")
    assert all(isinstance(m, sk.SparseConvTranspose2d) for m in g.deconvs)
    assert [m for _, m in g.layer_topk.values()] == ["global"] * 4
    assert [k for k, _ in g.layer_topk.values()] == list(MODEL_CONFIGS["aaai"].global_k)


def test_dense_baseline_has_the_same_parameters_and_no_masks():
    sparse, dense = SparseGenerator("cpu32"), SparseGenerator("cpu32", sparse=False)
    assert shapes(sparse) == shapes(dense)
    dense.load_state_dict(sparse.state_dict())
    _, acts = dense(torch.randn(2, 32), return_activations=True)
    # without masks more than k entries per channel survive the ReLU
    k = sparse.layer_topk["block2"][0]
    assert (acts["block2"] != 0).flatten(2).sum(2).max() > k
    assert (sparse(torch.randn(2, 32), return_activations=True)[1]["block2"].to_dense() != 0).flatten(2).sum(2).max() <= k


def _reference_forward(g, z):
    """The sparse cvpr generator written out densely: Linear, ReLU + top-k masks, interpolate, conv2d."""
    F = torch.nn.functional
    cfg = g.config
    h = g.fc(z).view(z.shape[0], cfg.fc_channels, cfg.base_size, cfg.base_size)
    a = topk_mask_ref(h, cfg.fc_k, "channel", relu=True)
    for i, blk in enumerate(g.blocks):
        h = F.relu(F.conv2d(F.interpolate(a, scale_factor=2), blk.up.weight, blk.up.bias, padding=1))
        h = F.conv2d(h, blk.conv.weight, None, padding=1)
        a = topk_mask_ref(h, g.layer_topk[f"block{i + 1}"][0], "spatial", bias=blk.conv.bias, relu=True)
    h = F.relu(F.conv2d(F.interpolate(a, scale_factor=2), g.final.up.weight, g.final.up.bias, padding=1))
    h = F.relu(g.final.conv(h))
    return torch.tanh(g.out(h))


@pytest.mark.parametrize("use_kernels", [True, False])
def test_sparse_forward_matches_a_dense_reference(use_kernels):
    torch.manual_seed(0)
    g = SparseGenerator("cpu32", use_kernels=use_kernels).double()
    z = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(g(z), _reference_forward(g, z), rtol=1e-9, atol=1e-9)


def test_compact_activations_are_consumed_without_densifying(monkeypatch):
    g = SparseGenerator("tiny16")

    def boom(self):
        raise AssertionError("a SparseActivation was densified inside the generator")

    monkeypatch.setattr(sk.SparseActivation, "to_dense", boom)
    g(torch.randn(2, g.z_dim))


@pytest.mark.parametrize("sparse", [True, False])
def test_every_parameter_gets_a_gradient(sparse):
    g = SparseGenerator("tiny16", sparse=sparse)
    g(torch.randn(4, g.z_dim)).square().sum().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_decode_from_reproduces_the_forward_pass():
    torch.manual_seed(1)
    g = SparseGenerator("cpu32")
    y, acts = g(torch.randn(2, 32), return_activations=True)
    for name, a in acts.items():
        torch.testing.assert_close(g.decode_from(name, a), y)
        torch.testing.assert_close(g.decode_from(name, a.to_dense()), y, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown layer"):
        g.decode_from("nope", acts["fc"])


def test_decode_from_gives_the_basis_function_of_a_unit():
    """d image / d (one surviving value) with later selections fixed: what the AND-OR trees draw."""
    torch.manual_seed(2)
    g = SparseGenerator("tiny16")
    _, acts = g(torch.randn(1, g.z_dim), return_activations=True)
    a = acts["fc"]
    values = a.values.detach().clone().requires_grad_(True)
    logits = g.decode_from("fc", sk.SparseActivation(values, a.indices, a.shape, a.mode), logits=True)
    (basis,) = torch.autograd.grad(logits.sum(), values)
    assert basis.shape == a.values.shape and basis.abs().sum() > 0


def test_sample_is_reproducible():
    g = SparseGenerator("tiny16")
    a = g.sample(3, rng=torch.Generator().manual_seed(0))
    b = g.sample(3, rng=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (3, 3, 16, 16)


def test_critic_loss_with_a_linear_critic():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
    critic = lambda x: lin(x).squeeze(1)  # noqa: E731
    real, fake = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    loss, stats = critic_loss(critic, real, fake, gp_weight=10.0, eps=torch.rand(5, 1, 1, 1))
    w = lin[1].weight
    gp = (w.norm() - 1) ** 2  # grad_x f = w everywhere
    expected = critic(real).mean() - critic(fake).mean() + 10 * gp
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["gp"], gp.detach())
    loss.backward()
    assert w.grad is not None
    with pytest.raises(ValueError, match="eps"):
        critic_loss(critic, real, fake, gp_weight=1.0)


@pytest.mark.parametrize("changes, field", [
    (dict(arch="gan"), "arch"), (dict(z_dim=0), "z_dim"), (dict(fc_k=4000), "fc_k"),
    (dict(block_density=0.0), "block_density"), (dict(block_density=1.5), "block_density"),
    (dict(block_channels=()), "block_channels"), (dict(block_channels=(64, -1)), "block_channels"),
    (dict(z_dim=True), "z_dim"), (dict(critic_channels=(8,) * 7), "critic_channels"),
    (dict(arch="aaai", global_k=(1, 2)), "global_k"),
    (dict(arch="aaai", global_k=(10 ** 9, 1, 1, 1)), "global_k"),
])
def test_bad_model_configs_are_rejected_with_the_field_named(changes, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field} = "):
        ModelConfig(**changes)


def test_bad_generator_arguments():
    with pytest.raises(ValueError, match="unknown model config 'nope'"):
        SparseGenerator("nope")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        SparseGenerator({"z_dims": 3})
    with pytest.raises(TypeError, match="sparse"):
        SparseGenerator("tiny16", sparse="yes")
    g = SparseGenerator("tiny16")
    with pytest.raises(ValueError, match=r"z must be \[N, 8\]"):
        g(torch.randn(2, 9))
    with pytest.raises(ValueError, match="images must be"):
        EnergyCritic("tiny16")(torch.randn(2, 3, 32, 32))


def test_folded_dense_upsample_equals_interpolate_then_conv():
    """``dense_upsample="folded"`` (one stride-2 transposed conv on the folded weight) is the same function,
    with the same parameter gradients, as nearest-x2 ``F.interpolate`` + 3x3 ``F.conv2d``."""
    torch.manual_seed(0)
    ref = SparseGenerator("tiny16", sparse=False).double()
    folded = SparseGenerator("tiny16", sparse=False, dense_upsample="folded").double()
    folded.load_state_dict(ref.state_dict())
    assert ref.dense_upsample == "interpolate" and "dense_upsample='folded'" in repr(folded)
    z = torch.randn(3, ref.z_dim, dtype=torch.float64)
    y_ref, y = ref(z), folded(z)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), folded.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-10, msg=name)
    with pytest.raises(ValueError, match="'nearest'"):
        SparseGenerator("tiny16", sparse=False, dense_upsample="nearest")
    with pytest.raises(ValueError, match="'bogus'"):
        folded.dense_upsample = "bogus"
    assert folded.dense_upsample == "folded"
