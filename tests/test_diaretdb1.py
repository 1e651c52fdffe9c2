"""DiaretDB1 reader: official 0.75 binarisation, layout, splits, missing-file errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _synth_diaretdb1 import fov_mask, make_layout
from retina_fgvis.datasets.diaretdb1 import (
    LESION_TYPES, DiaretDB1, DiaretDB1Error, binarise_gt, find_root,
)

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "diaretdb1"


def test_binarise_075_known_grey_levels():
    # value/252 = mean expert confidence; 0.75 <=> grey >= 189.
    # 168 = 21*8 -> 0.667 -> 0 ; 189 = 21*9 -> 0.75 exactly -> 1 ; 252 -> 1.
    grey = np.array([[0, 21, 126, 168, 189, 210, 231, 252]], dtype=np.uint8)
    assert binarise_gt(grey).tolist() == [[False] * 4 + [True] * 4]
    # an RGB-saved map reads the same
    assert binarise_gt(np.repeat(grey[..., None], 3, axis=2)).tolist() == [[False] * 4 + [True] * 4]
    # FOV restriction removes lesion pixels outside the field of view
    fov = np.array([[True] * 6 + [False] * 2])
    assert binarise_gt(grey, fov).tolist() == [[False] * 4 + [True] * 2 + [False] * 2]


def _layout(tmp_path):
    specs = {
        "image001": {"H": [(20, 20, 26, 26, 189)], "HE": [(30, 40, 34, 44, 168)]},  # HE below cut
        "image002": {"HE": [(30, 40, 34, 44, 252)], "RSD": [(10, 38, 12, 40, 210)]},
        "image003": {"SE": [(0, 0, 5, 5, 252)]},                     # outside the FOV circle
        "image004": {},
    }
    return make_layout(tmp_path, specs, train=["image001", "image002", "image003"],
                       test=["image004", "image005"], write_test_images=False)


def test_layout_and_counts(tmp_path):
    root = _layout(tmp_path)
    ds = DiaretDB1(root, "train")
    assert ds.names == ["image001", "image002", "image003"] and len(ds) == 3
    assert find_root(root / "diaretdb1_v_1_1") == find_root(root)
    assert np.array_equal(ds.fov, fov_mask())
    present = {t: [im.has(t) for im in ds] for t in LESION_TYPES}
    assert present == {"H": [True, False, False], "HE": [False, True, False],
                       "SE": [False, False, False], "RSD": [False, True, False]}
    im = ds[0]
    assert im.rgb.shape == (60, 80, 3) and im.rgb.dtype == np.uint8
    assert im.gt["H"].sum() == 36


def test_missing_split_fails_with_one_line_naming_files(tmp_path):
    root = _layout(tmp_path)
    with pytest.raises(DiaretDB1Error) as err:
        DiaretDB1(root, "test")
    msg = str(err.value)
    assert "\n" not in msg and "image004.png" in msg and "2 of 2 images" in msg
    with pytest.raises(DiaretDB1Error, match="3 of 5|2 of 5"):
        DiaretDB1(root, "all")
    with pytest.raises(DiaretDB1Error, match="unknown split"):
        DiaretDB1(root, "val")
    with pytest.raises(DiaretDB1Error, match="does not exist"):
        DiaretDB1(tmp_path / "nope")


def test_missing_gt_map_named(tmp_path):
    root = _layout(tmp_path)
    (root / "diaretdb1_v_1_1/resources/images/ddb1_groundtruth/softexudates/image002.png").unlink()
    with pytest.raises(DiaretDB1Error, match="softexudates/image002.png"):
        DiaretDB1(root, "train")


@pytest.mark.data
@pytest.mark.skipif(not REAL.exists(), reason="DiaretDB1 not present at ../shared/data/diaretdb1 "
                                               "(licence forbids redistribution; synthetic tests cover the reader)")
def test_real_training_split_counts():
    ds = DiaretDB1(REAL, "train")
    assert len(ds) == 28
    counts = dict.fromkeys(LESION_TYPES, 0)
    for fname in ds.files:
        gt = ds.load_gt(fname)
        for t in LESION_TYPES:
            counts[t] += bool(gt[t].any())
    assert counts == {"HE": 18, "SE": 6, "RSD": 19, "H": 21}
    im = ds[0]
    assert im.rgb.shape == (1152, 1500, 3) and im.fov.shape == (1152, 1500)


def test_unreadable_files_say_why_and_only_the_fov_mask_is_fatal(tmp_path):
    """An unreadable image or GT map was `cannot read image (OSError)` (a class name, no reason) and
    looked like any other DiaretDB1Error, so a run stopped; now it is a per-image error in words,
    while a damaged FOV mask (every image needs it) stays a plain, fatal DiaretDB1Error."""
    from retina_fgvis.datasets.diaretdb1 import DiaretDB1ImageError

    root = _layout(tmp_path)
    res = root / "diaretdb1_v_1_1" / "resources" / "images"
    image = res / "ddb1_fundusimages" / "image001.png"
    image.write_bytes(image.read_bytes()[:200])          # truncated PNG
    (res / "ddb1_groundtruth" / "hardexudates" / "image002.png").write_text("not a png")
    ds = DiaretDB1(root, "train")
    with pytest.raises(DiaretDB1ImageError) as err:
        ds.load("image001")
    assert str(err.value) == f"{image}: cannot read image: image file is truncated"
    with pytest.raises(DiaretDB1ImageError, match=r"hardexudates/image002.png: cannot read ground-truth map: "
                                                  r"not an image file PIL can decode"):
        ds.load("image002")
    assert ds.load("image003").name == "image003"
    (res / "ddb1_fundusmask" / "fmask.tif").write_text("not a tiff")
    with pytest.raises(DiaretDB1Error, match="fmask.tif: cannot read FOV mask: not an image file") as err:
        DiaretDB1(root, "train").load("image003")
    assert not isinstance(err.value, DiaretDB1ImageError)
