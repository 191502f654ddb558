"""Datasets: procedural parts with masks, scikit-image textures and faces, folders of images, specs."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sparsegen.data import ImageDataset, load_dataset, make_parts, parse_spec
from sparsegen.data.parts import BACKGROUND, PALETTE, SLOT_TYPES


def test_parts_is_deterministic_and_seeded():
    a, b, c = make_parts(12, 32, seed=0), make_parts(12, 32, seed=0), make_parts(12, 32, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert torch.equal(a.part_labels, b.part_labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (12, 3, 32, 32) and a.images.dtype == torch.uint8


def test_parts_masks_and_labels_describe_the_images():
    ds = make_parts(40, 32, seed=3)
    n_slots = len(SLOT_TYPES)
    assert ds.masks.shape == (40, n_slots, 32, 32) and ds.masks.dtype == torch.bool
    assert ds.part_labels.shape == (40, n_slots)
    offsets = np.cumsum([0] + [len(t) for t in SLOT_TYPES])
    for s in range(n_slots):  # each slot draws only its own part types (OR under the AND slot)
        assert ((ds.part_labels[:, s] >= offsets[s]) & (ds.part_labels[:, s] < offsets[s + 1])).all()
    assert (ds.masks.sum((2, 3)) > 5).all()  # every part is drawn
    assert ds.masks.sum(1).max() <= 1  # parts do not overlap
    img = ds.images.float() / 255
    bg = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    outside = ~ds.masks.any(1, keepdim=True).expand_as(img)
    # away from the parts (and their anti-aliased rims) the image is background
    far = outside & ~torch.nn.functional.max_pool2d(ds.masks.any(1, keepdim=True).float(), 3, 1, 1).bool().expand_as(img)
    assert (img - bg).abs()[far].max() < 0.02
    # inside a mask, the pixel has the part's palette colour
    colors = ds.info["colors"]
    for i in range(5):
        for s in range(n_slots):
            m = ds.masks[i, s]
            interior = torch.nn.functional.avg_pool2d(m[None, None].float(), 3, 1, 1)[0, 0] == 1
            if interior.any():
                got = img[i][:, interior].mean(1)
                torch.testing.assert_close(got, torch.tensor(PALETTE[colors[i, s]], dtype=torch.float32),
                                           atol=0.01, rtol=0)


def test_parts_at_64_and_bad_arguments():
    assert make_parts(2, 64).images.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="n must be"):
        make_parts(0)
    with pytest.raises(ValueError, match="image_size"):
        make_parts(2, 4)


def test_textures_and_faces_from_scikit_image():
    pytest.importorskip("skimage")
    t = load_dataset("textures:n=9,seed=1", 32)
    assert t.images.shape == (9, 3, 32, 32)
    assert torch.equal(t.images, load_dataset("textures:n=9,seed=1", 32).images)
    assert t.info["labels"].tolist() == [0, 1, 2] * 3
    assert torch.equal(t.images[:, 0], t.images[:, 1])  # gray replicated
    f = load_dataset("faces", 32)
    assert f.images.shape == (200, 3, 32, 32)
    assert (f.images[100:].int() - f.images[:100].flip(-1).int()).abs().max() <= 1  # mirror images
    assert load_dataset("faces:flips=false", 16).images.shape == (100, 3, 16, 16)


def test_batches_are_floats_in_minus_one_one():
    ds = make_parts(6, 16)
    x = ds.batch([0, 5, 2])
    assert x.dtype == torch.float32 and x.shape == (3, 3, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(ds[5], x[1])
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 3, 4, 4), "x")


def _write_folder(root, n_good=5):
    os.makedirs(os.path.join(root, "sub"))
    rng = np.random.default_rng(0)
    for i in range(n_good):
        arr = (rng.random((40 + 8 * i, 60, 3)) * 255).astype(np.uint8)  # non-square, various sizes
        Image.fromarray(arr).save(os.path.join(root, "sub" if i % 2 else "", f"img{i}.png"))
    Image.fromarray((rng.random((30, 30)) * 255).astype(np.uint8), mode="L").save(os.path.join(root, "gray.jpg"))
    with open(os.path.join(root, "broken.jpg"), "wb") as f:
        f.write(b"not an image at all")
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("ignored: not an image extension")


def test_folder_skips_and_counts_unreadable_files(tmp_path):
    root = str(tmp_path / "imgs")
    _write_folder(root)
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable file"):
        ds = load_dataset(root, 24)
    assert len(ds) == 6 and ds.images.shape == (6, 3, 24, 24)
    assert ds.info["skipped"] == 1 and ds.info["skipped_files"][0].endswith("broken.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(load_dataset(f"folder:{root}@3", 24)) == 3


def test_folder_centre_crops():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        arr = np.zeros((20, 60, 3), dtype=np.uint8)
        arr[:, 20:40] = 255  # the centre square is white, the sides black
        Image.fromarray(arr).save(os.path.join(d, "wide.png"))
        ds = load_dataset(d, 10)
        assert ds.images.float().mean() > 250


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        load_dataset(str(tmp_path), 16)
    with open(tmp_path / "bad.png", "wb") as f:
        f.write(b"garbage")
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="could be read"):
        load_dataset(str(tmp_path), 16)


@pytest.mark.parametrize("spec, match", [
    ("nosuchdataset", "unknown dataset"), ("parts:n=abc", "bad value"), ("parts:size=3", "bad option"),
    ("parts:n", "bad option"), ("", "non-empty"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(spec)


def test_spec_parsing():
    assert parse_spec("parts") == ("parts", {})
    assert parse_spec("parts:n=10,seed=4") == ("parts", {"n": 10, "seed": 4})
    assert parse_spec("textures:n=5") == ("textures", {"n": 5})
