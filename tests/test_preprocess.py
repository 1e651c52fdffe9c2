"""Fundus reading and preprocessing: FOV detection, exact grid mapping, errors."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from retina_fgvis.fundus.io import Fundus, FundusReadError, read_fundus, register_reader
from retina_fgvis.fundus.preprocess import (GridMapping, NoFundusError, crop_fundus_uint8,
                                            detect_fov, detect_fov_circle, prepare_fundus)
from tests._fundus_synth import synthetic_fundus, true_disc

DDB1 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "diaretdb1" / "diaretdb1_v_1_1"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# --------------------------------------------------------------------------- FOV detection


def test_fov_synthetic_disc_inside_image():
    img = synthetic_fundus(300, 400, cx=210, cy=145, r=130, seed=1)
    fov, c = detect_fov_circle(img)
    assert fov.shape == (300, 400) and fov.dtype == bool
    assert abs(c.cx - 210) < 2 and abs(c.cy - 145) < 2 and abs(c.r - 130) < 3
    assert iou(fov, true_disc(300, 400, 210, 145, 130)) > 0.97


def test_fov_disc_cut_by_border_like_diaretdb1():
    # 1500x1152-like aspect, scaled down: the circle touches/crosses top and bottom.
    h, w, r = 230, 300, 125
    img = synthetic_fundus(h, w, cx=150, cy=115, r=r, seed=2)
    fov, c = detect_fov_circle(img)
    assert abs(c.r - r) < 4
    assert iou(fov, true_disc(h, w, 150, 115, r)) > 0.96
    prep = prepare_fundus(img, size=128)
    m = prep.mapping
    assert m.y0 < 0 and m.y0 + m.side > h  # square crop padded above and below
    assert prep.tensor.shape == (3, 128, 128)


def test_fov_cropped_square_circle_larger_than_image_like_eyepacs():
    # EyePACS/ODIR 400/512 crops: only the four corner arcs of the circle are visible.
    img = synthetic_fundus(200, 200, cx=100, cy=100, r=120, seed=3)
    fov, c = detect_fov_circle(img)
    assert abs(c.cx - 100) < 3 and abs(c.cy - 100) < 3 and abs(c.r - 120) < 5
    assert fov.mean() > 0.9


def test_fov_skimage_retina():
    data = pytest.importorskip("skimage.data")
    img = data.retina()  # 1411x1411 real fundus photograph
    small = cv2.resize(img, (353, 353), interpolation=cv2.INTER_AREA)
    fov, c = detect_fov_circle(small)
    assert abs(c.cx - 176.5) < 6 and abs(c.cy - 176.5) < 6
    assert 0.7 < fov.mean() < 0.85
    # the corners are background, the centre is fundus
    assert not fov[:10, :10].any() and fov[170:180, 170:180].all()


@pytest.mark.parametrize("kind", ["black", "grey", "white", "noise", "tiny_blob"])
def test_no_fundus_error(kind):
    rng = np.random.default_rng(0)
    img = {
        "black": np.zeros((120, 160, 3), np.uint8),
        "grey": np.full((120, 160, 3), 128, np.uint8),
        "white": np.full((120, 160, 3), 255, np.uint8),
        "noise": rng.integers(0, 256, (120, 160, 3), dtype=np.uint8),
        "tiny_blob": cv2.circle(np.zeros((200, 200, 3), np.uint8), (50, 50), 8, (200, 100, 50), -1),
    }[kind]
    with pytest.raises(NoFundusError, match="no circular field of view found"):
        detect_fov(img)
    with pytest.raises(NoFundusError):
        prepare_fundus(img, size=64)


# --------------------------------------------------------------------------- grid mapping


@pytest.mark.parametrize("box,size,shape", [((-10.0, -40.0, 230.0), 64, (150, 210)),
                                            ((5.0, 7.0, 100.0), 512, (120, 130)),
                                            ((-36.0, -210.0, 1572.0), 512, (1152, 1500))])
def test_grid_mapping_round_trip_within_a_pixel(box, size, shape):
    m = GridMapping(x0=box[0], y0=box[1], side=box[2], size=size, original_shape=shape)
    rng = np.random.default_rng(0)
    # every original pixel centre -> model -> back: exact in floating point
    xy = np.stack([rng.integers(0, shape[1], 500), rng.integers(0, shape[0], 500)], 1).astype(float)
    assert np.allclose(m.to_original(m.to_model(xy)), xy, atol=1e-9)
    # snapped to the model pixel it falls in and back: within one (model) pixel
    uv = np.floor(m.to_model(xy) + 0.5)
    back = m.to_original(uv)
    assert np.abs(back - xy).max() <= 0.5 * m.scale + 1e-9
    assert np.abs(m.to_model(back) - m.to_model(xy)).max() <= 0.5 + 1e-9
    # model pixel centres -> original, rounded to the original pixel -> back: within a pixel
    uv = np.stack([rng.integers(0, size, 300), rng.integers(0, size, 300)], 1).astype(float)
    xy2 = np.round(m.to_original(uv))
    # (rounding moves a point by <= half an original pixel = 0.5 / scale model pixels)
    assert np.abs(m.to_model(xy2) - uv).max() <= 0.5 / m.scale + 1e-9


def test_corner_convention():
    m = GridMapping(x0=10.0, y0=20.0, side=200.0, size=100, original_shape=(300, 300))
    # model pixel 0 covers original [10, 12): centre 11 - 0.5 = 10.5 in index coordinates
    assert np.allclose(m.to_original(np.array([0.0, 0.0])), [10.5, 20.5])
    assert np.allclose(m.to_model(np.array([10.5, 20.5])), [0.0, 0.0])


def test_map_to_original_dot_lands_on_its_pixel():
    h, w = 230, 300
    img = synthetic_fundus(h, w, cx=150, cy=115, r=125, seed=4)
    prep = prepare_fundus(img, size=96)
    m = prep.mapping
    for (u, v) in [(48, 48), (20, 70), (75, 30)]:
        mm = np.zeros((96, 96), np.float32)
        mm[v, u] = 1.0
        back = m.map_to_original(mm, order=1)
        y, x = np.unravel_index(np.argmax(back), back.shape)
        ex, ey = m.to_original(np.array([u, v], float))
        assert abs(x - ex) <= 1.0 and abs(y - ey) <= 1.0
        nearest = m.map_to_original(mm, order=0)
        assert nearest.sum() > 0
    # bool and multi-channel maps keep dtype / channels; 0 outside the crop
    out_b = m.map_to_original(prep.fov_model, order=0)
    assert out_b.dtype == bool and out_b.shape == (h, w)
    assert iou(out_b, prep.fov_original) > 0.95
    out_c = m.map_to_original(np.ones((96, 96, 3), np.float32))
    assert out_c.shape == (h, w, 3)
    assert out_c[0, 150, 0] == 1.0 and out_c[229, 150, 2] == 1.0  # crop covers the full height
    assert out_c[115, 0, 0] == 0.0  # left of the crop box (x0 = 20)
    m2 = GridMapping(x0=50, y0=50, side=100, size=50, original_shape=(200, 200))
    assert m2.map_to_original(np.ones((50, 50), np.float32))[10, 10] == 0.0


def test_crop_then_map_back_reproduces_image():
    img = synthetic_fundus(256, 256, cx=128, cy=128, r=110, seed=5)
    crop, fov_m, fov_o, m = crop_fundus_uint8(img, size=256)
    back = m.map_to_original(crop.astype(np.float32))
    inner = true_disc(256, 256, 128, 128, 100)
    assert np.abs(back[inner] - img[inner]).mean() < 6.0


# --------------------------------------------------------------------------- prepare


def test_prepare_fundus_normalisation_and_outside_zero():
    img = synthetic_fundus(200, 260, cx=130, cy=100, r=90, seed=6)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    prep = prepare_fundus(img, size=64, mean=mean, std=std)
    t = prep.tensor
    assert t.dtype == torch.float32 and t.shape == (3, 64, 64)
    assert prep.fov_model.shape == (64, 64) and prep.fov_original.shape == (200, 260)
    out = torch.from_numpy(~prep.fov_model)
    assert float(t[:, out].abs().max()) == 0.0
    assert float(t[:, torch.from_numpy(prep.fov_model)].abs().mean()) > 0.05
    assert t.min() >= -1.0 - 1e-6 and t.max() <= 1.0 + 1e-6


def test_prepare_with_given_fov_mask():
    img = synthetic_fundus(230, 300, cx=150, cy=115, r=125, seed=7)
    fov = true_disc(230, 300, 150, 115, 120) & true_disc(230, 300, 150, 115, 1000)
    prep = prepare_fundus(img, size=64, fov=fov)
    assert prep.fov_original is not None and prep.fov_original.sum() == fov.sum()


# --------------------------------------------------------------------------- io


def test_read_formats(tmp_path: Path):
    import tifffile
    from PIL import Image

    img = synthetic_fundus(80, 100, seed=8)
    Image.fromarray(img).save(tmp_path / "123_left.png")
    Image.fromarray(img).save(tmp_path / "123_right.jpg", quality=95)
    tifffile.imwrite(tmp_path / "a.tif", (img.astype(np.uint16) * 257))
    Image.fromarray(img[..., 1]).save(tmp_path / "grey.png")
    f = read_fundus(tmp_path / "123_left.png")
    assert isinstance(f, Fundus) and f.rgb.dtype == np.uint8 and f.rgb.shape == (80, 100, 3)
    assert np.array_equal(f.rgb, img) and f.eye == "left" and f.patient_id == "123"
    assert read_fundus(tmp_path / "123_right.jpg").eye == "right"
    t = read_fundus(tmp_path / "a.tif").rgb
    assert t.dtype == np.uint8 and np.abs(t.astype(int) - img).max() <= 1
    g = read_fundus(tmp_path / "grey.png").rgb
    assert g.shape == (80, 100, 3) and np.array_equal(g[..., 0], g[..., 2])


def test_read_errors_are_one_line(tmp_path: Path):
    with pytest.raises(FundusReadError) as e:
        read_fundus(tmp_path / "missing.png")
    assert str(e.value) == f"{tmp_path / 'missing.png'}: file not found"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(FundusReadError) as e:
        read_fundus(bad)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(bad))
    (tmp_path / "x.xyz").write_text("?")
    with pytest.raises(FundusReadError, match="unsupported file type"):
        read_fundus(tmp_path / "x.xyz")


def test_reader_hook(tmp_path: Path):
    p = tmp_path / "scan.fake"
    p.write_text("x")
    register_reader(".fake", lambda path: Fundus(rgb=np.zeros((20, 20), np.uint8), source=str(path),
                                                 patient_id="P", eye="left"))
    f = read_fundus(p)
    assert f.rgb.shape == (20, 20, 3) and f.patient_id == "P"


@pytest.mark.data
def test_diaretdb1_fov_against_official_mask():
    img_p = DDB1 / "resources" / "images" / "ddb1_fundusimages" / "image001.png"
    mask_p = DDB1 / "resources" / "images" / "ddb1_fundusmask" / "fmask.tif"
    if not img_p.exists() or not mask_p.exists():
        pytest.skip("../shared/data/diaretdb1 not present")
    img = read_fundus(img_p).rgb
    official = read_fundus(mask_p).rgb[..., 0] > 0
    fov = detect_fov(img)
    assert iou(fov, official) > 0.95
    prep = prepare_fundus(img, size=128)
    back = prep.mapping.map_to_original(prep.fov_model, order=0)
    assert iou(back, fov) > 0.95
