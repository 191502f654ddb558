"""Parse graphs and basis functions: hand-made activations, the linearity identity, known kernels."""
import json
from types import SimpleNamespace

import pytest
import sparsegen_kernels as sk
import torch
import torch.nn.functional as F

from sparsegen import SparseGenerator
from sparsegen.model.configs import MODEL_CONFIGS, ModelConfig
from sparsegen.readout.andor import layer_parse, parse, part_layer, select_units, tree_layers
from sparsegen.readout.basis import FixedParse, crop, energy_center, kernel_dictionary, support_size

# A small AAAI-style network: FC -> deconv (global top-K) -> deconv to the image.
AAAI_TINY = ModelConfig(name="aaai-tiny", arch="aaai", z_dim=6, fc_channels=8, block_channels=(6,),
                        global_k=(12, 40), critic_stem=4, critic_channels=(4, 8))


def _gen(config="tiny16", sparse=True, use_kernels=True, seed=0):
    torch.manual_seed(seed)
    return SparseGenerator(config, sparse=sparse, use_kernels=use_kernels).double().eval()


def _z(g, n=2, seed=1):
    return torch.randn(n, g.z_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
def test_layer_parse_of_a_hand_made_compact_activation():
    # spatial mode, N=1, C=2, H=W=2, k=2: channel 0 keeps positions 1 (0.5) and 3 (2.0);
    # channel 1 keeps 0 (0.0, selected but zero after ReLU: not a unit) and 2 (1.0).
    values = torch.tensor([[[0.5, 2.0], [0.0, 1.0]]])
    indices = torch.tensor([[[1, 3], [0, 2]]], dtype=torch.int16)
    sa = sk.SparseActivation(values, indices, (1, 2, 2, 2), "spatial")
    lp = layer_parse("l", sa)
    assert len(lp) == 3
    assert lp.image.tolist() == [0, 0, 0]
    # sorted by position: (0,1) c0, (1,0) c1, (1,1) c0
    assert lp.position.tolist() == [1, 2, 3]
    assert lp.channel.tolist() == [0, 1, 0]
    assert lp.coefficient.tolist() == [0.5, 1.0, 2.0]
    assert lp.slot.tolist() == [0, 3, 1]  # flat index into values[0] ([G=2, k=2])
    nodes = lp.and_nodes(0)
    assert nodes == {(0, 1): [(0, 0.5)], (1, 0): [(1, 1.0)], (1, 1): [(0, 2.0)]}
    assert lp.strongest_or_node(0) == (1, 1)
    d = lp.to_dict(0)
    assert d["grid"] == [2, 2] and d["n_units"] == 3 and d["and"][2]["or"][0] == {"channel": 0, "coefficient": 2.0}


def test_layer_parse_channel_mode_orders_or_children_by_coefficient():
    # channel mode, C=4, H=1, W=2, k=2: position 0 keeps channels 1 (0.25) and 3 (0.75).
    values = torch.tensor([[[0.25, 0.75], [0.5, 0.125]]])
    indices = torch.tensor([[[1, 3], [0, 2]]], dtype=torch.int16)
    lp = layer_parse("fc", sk.SparseActivation(values, indices, (1, 4, 1, 2), "channel"))
    assert lp.and_nodes(0) == {(0, 0): [(3, 0.75), (1, 0.25)], (0, 1): [(0, 0.5), (2, 0.125)]}
    assert lp.or_node(0, 0, 0).tolist() == [0, 1]


def test_layer_parse_of_a_dense_map_keeps_positive_entries():
    x = torch.zeros(2, 3, 2, 2)
    x[0, 2, 1, 0] = 1.5
    x[1, 0, 0, 1] = 0.25
    x[1, 1, 0, 0] = -1.0  # negative: not a unit
    lp = layer_parse("d", x)
    assert len(lp) == 2 and lp.compact is False and lp.mode is None
    assert lp.image.tolist() == [0, 1] and lp.channel.tolist() == [2, 0] and lp.position.tolist() == [2, 1]
    assert lp.slot.tolist() == [2 * 4 + 2, 1]


def test_parse_graph_of_a_generator_matches_its_topk_and_exports_json(tmp_path):
    g = _gen()
    images, graph = parse(g, _z(g, 3))
    assert images.shape == (3,) + g.image_shape
    assert graph.names == g.layer_names
    for name in g.layer_names:
        lp = graph[name]
        k, mode = g.layer_topk[name]
        C, H, W = g.layer_shapes[name]
        G = H * W if mode == "channel" else C
        per_image = torch.bincount(lp.image, minlength=3)
        assert bool((per_image <= G * k).all()) and bool((per_image > 0).all())
        assert bool((lp.coefficient > 0).all())
        if mode == "channel":  # at most k OR children at every position
            for n in range(3):
                assert max(len(v) for v in lp.and_nodes(n).values()) <= k
    path = graph.save_json(str(tmp_path / "parse.json"), max_or=3)
    doc = json.loads(open(path).read())
    assert doc["format"] == "sparsegen.andor/1" and len(doc["images"]) == 3
    layer = doc["images"][1]["layers"][0]
    assert layer["name"] == "fc" and all(len(a["or"]) <= 3 for a in layer["and"])
    assert sum(a["n_or"] for a in layer["and"]) == layer["n_units"]
    assert doc["meta"]["sparse"] is True


def test_tree_layers_and_part_layer():
    def names_only(config):  # the layer names of SparseGenerator(config), without building its weights
        return SimpleNamespace(layer_names=["fc"] + [f"block{i + 1}" for i in range(len(config.block_channels))])

    paper, cpu = names_only(MODEL_CONFIGS["paper64"]), names_only(MODEL_CONFIGS["cpu32"])
    assert names_only(MODEL_CONFIGS["tiny16"]).layer_names == SparseGenerator("tiny16").layer_names
    assert tree_layers(paper) == ["block1", "block2", "block3"] and part_layer(paper) == "block1"
    assert tree_layers(cpu) == ["fc", "block1", "block2"] and part_layer(cpu) == "fc"


def test_select_units_takes_the_strongest_per_image():
    g = _gen()
    _, graph = parse(g, _z(g, 2))
    lp = graph["block1"]
    rows = select_units(lp, 5)
    assert rows.numel() == 10
    for n in range(2):
        r = rows[lp.image[rows] == n]
        best = torch.sort(lp.coefficient[lp.units_of(n)], descending=True).values[:5]
        assert torch.equal(lp.coefficient[r], best)


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, sparse, use_kernels, dense_upsample", [
    ("tiny16", True, True, "interpolate"), ("tiny16", True, False, "interpolate"),
    ("tiny16", False, True, "interpolate"), ("tiny16", False, True, "folded"),
    (AAAI_TINY, True, True, "interpolate"), (AAAI_TINY, False, True, "interpolate"),
])
def test_linearity_identity(config, sparse, use_kernels, dense_upsample):
    """With every mask fixed, coefficient-weighted bases + the bias term give the parse's pre-tanh output (the
    read-out runs through the generator's own layer functions, so on its dense formulation too)."""
    g = _gen(config, sparse, use_kernels)
    g.dense_upsample = dense_upsample
    n_images = 2 if sparse and use_kernels else 1  # dense parses have many units: one image is enough
    fp = FixedParse(g, _z(g, n_images))
    for layer in g.layer_names:
        ref = g.decode_from(layer, fp.acts[layer], logits=True)
        lp = fp.graph[layer]
        for n in range(n_images):
            rows = lp.units_of(n)
            contrib = fp.contributions(layer, rows, batch_size=97)
            total = contrib.sum(0, keepdim=True) + fp.bias_term(layer, n)
            torch.testing.assert_close(total, ref[n:n + 1], atol=1e-11, rtol=1e-9)
            torch.testing.assert_close(fp.logits(layer, n), ref[n:n + 1], atol=1e-12, rtol=1e-10)
            # s_j * B_j == contribution (the basis scales linearly with its coefficient)
            b = fp.bases(layer, rows[:5])
            torch.testing.assert_close(b * lp.coefficient[rows[:5]].view(-1, 1, 1, 1), contrib[:5],
                                       atol=1e-12, rtol=1e-9)


def test_bases_are_the_jacobian_columns_of_decode_from():
    """B_j = d logits / d s_j with later selections fixed: check against autograd (one VJP checks all)."""
    g = _gen("tiny16", sparse=True, use_kernels=True)
    fp = FixedParse(g, _z(g, 1))
    layer = "fc"
    act = fp.acts[layer]
    values = act.values.detach().clone().requires_grad_(True)
    out = g.decode_from(layer, sk.SparseActivation(values, act.indices, act.shape, act.mode), logits=True)
    v = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad((out * v).sum(), values)
    lp = fp.graph[layer]
    b = fp.bases(layer)
    expect = (b * v).flatten(1).sum(1)
    got = grad.reshape(-1)[lp.slot]
    torch.testing.assert_close(got, expect, atol=1e-11, rtol=1e-9)


def test_children_are_the_one_step_linear_contributions():
    """Summing every unit's contributions to the next layer (+ that layer's bias term) gives its activation."""
    g = _gen("tiny16")
    fp = FixedParse(g, _z(g, 1))
    lp0, lp1 = fp.graph["fc"], fp.graph["block1"]
    rows = torch.arange(len(lp0))
    per_unit = fp.step(0, 1, fp.unit_activation("fc", 0, rows), with_bias=False).values.reshape(len(lp0), -1)
    total = per_unit.sum(0) + fp.step(0, 1, fp.zero_activation("fc", 0), with_bias=True).values.reshape(-1)
    own = fp.acts["block1"].values[0].reshape(-1)
    torch.testing.assert_close(total * (own > 0), own, atol=1e-12, rtol=1e-9)
    for row in range(3):
        kids, w = fp.children("fc", row)
        assert bool((w > 0).all()) and bool((w[:-1] >= w[1:]).all())
        received = per_unit[row][lp1.slot]  # what every block1 unit receives from this fc unit
        assert set(kids.tolist()) == set(torch.nonzero(received > 0).flatten().tolist())
        torch.testing.assert_close(w, received[kids])
    assert fp.children("block1", 0)[0].numel() == 0  # the last sparsified layer has no children


def test_basis_of_a_unit_reproduces_its_known_kernel():
    """AAAI: below the last sparsified layer there is one transposed conv, so a unit's basis is its kernel."""
    g = _gen(AAAI_TINY)
    fp = FixedParse(g, _z(g, 1))
    lp = fp.graph["block1"]
    H, W = lp.grid
    h, w = lp.hw()
    rows = torch.nonzero((h >= 1) & (h < H - 1) & (w >= 1) & (w < W - 1)).flatten()
    assert rows.numel() > 0
    row = int(rows[0])
    c, hh, ww = int(lp.channel[row]), int(h[row]), int(w[row])
    pattern = torch.arange(3 * 4 * 4, dtype=torch.float64).view(3, 4, 4) / 10 - 2.0
    with torch.no_grad():
        g.out.weight[c] = pattern  # [Cin, 3, 4, 4]: below the selection, so the parse does not change
    fp = FixedParse(g, fp.z)
    b = fp.bases("block1", torch.tensor([row]))[0]
    expect = torch.zeros_like(b)
    # stride 2, padding 1: input (h, w) writes output rows 2h-1 .. 2h+2
    expect[:, 2 * hh - 1:2 * hh + 3, 2 * ww - 1:2 * ww + 3] = pattern
    torch.testing.assert_close(b, expect, atol=1e-12, rtol=0)
    assert torch.equal(kernel_dictionary(g, "final")[c], pattern)


def test_kernel_dictionary_is_the_linear_composition():
    g = _gen(AAAI_TINY)
    kd = kernel_dictionary(g, "block1")
    C, H, W = g.layer_shapes["block1"]
    x = torch.zeros(1, C, H, W, dtype=torch.float64)
    x[0, 2, H // 2, W // 2] = 1
    expect = F.conv_transpose2d(x, g.out.weight, None, 2, 1)
    torch.testing.assert_close(kd[2:3], expect)
    # Below the last sparsified layer the AAAI net is one transposed conv: the impulse response is linear.
    imp = kernel_dictionary(g, "block1", mode="impulse", amplitude=2.5)
    torch.testing.assert_close(imp, 2.5 * kd, atol=1e-12, rtol=1e-10)
    cvpr = _gen("tiny16")
    assert kernel_dictionary(cvpr, "fc").shape == (cvpr.layer_shapes["fc"][0],) + cvpr.image_shape
    with pytest.raises(ValueError, match="unknown layer"):
        kernel_dictionary(cvpr, "nope")
    with pytest.raises(ValueError, match="unknown mode"):
        kernel_dictionary(cvpr, "fc", mode="nope")
    assert kernel_dictionary(cvpr, "fc", mode="impulse").shape == (cvpr.layer_shapes["fc"][0],) + cvpr.image_shape


def test_crop_and_support_helpers():
    x = torch.zeros(1, 3, 16, 16)
    x[0, :, 4:8, 10:14] = 1.0
    c = energy_center(x)
    torch.testing.assert_close(c, torch.tensor([[6.0, 12.0]], dtype=torch.float64))
    assert int(support_size(x, 0.999)[0]) == 4
    cr = crop(x, c, 4)
    assert cr.shape == (1, 3, 4, 4) and float(cr.sum()) == 48.0
    edge = crop(x, torch.tensor([[0.0, 16.0]]), 6)  # clamped inside the image
    assert edge.shape == (1, 3, 6, 6)
