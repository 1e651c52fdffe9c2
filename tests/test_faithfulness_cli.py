"""`retina-fgvis evaluate faithfulness|defense` end to end on 2 tiny images with a tiny model."""
from __future__ import annotations

import importlib.util
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from retina_fgvis import faithfulness as F

torch.set_num_threads(1)

HAS_ENGINE = importlib.util.find_spec("retina_fgvis.fgvis.games") is not None


class Tiny(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x):
        return self.head(self.features(x))


def tiny_eval_model(kind: str = "imagenet", *_a, **_k) -> F.EvalModel:
    model = Tiny().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return F.EvalModel(kind="imagenet", model=model, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                       input_size=32, class_names=["a", "b", "c", "d"], description="tiny test CNN")


@pytest.fixture()
def tiny_setup(tmp_path, monkeypatch):
    return make_tiny_setup(tmp_path, monkeypatch)


def make_tiny_setup(tmp_path, monkeypatch):
    """(CLI app, a folder of 2 random 40x48 images, an --out path) with the tiny model patched in."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    monkeypatch.setattr(F, "load_eval_model", tiny_eval_model)
    from retina_fgvis.cli import app

    return app, folder, tmp_path / "out"


def test_faithfulness_cli_end_to_end(tiny_setup):
    app, folder, out = tiny_setup
    methods = "gradcam,occlusion,lime,rise,gradient" + (",fgvis" if HAS_ENGINE else "")
    args = ["evaluate", "faithfulness", "--model", "imagenet", "--images", str(folder), "--out", str(out),
            "--methods", methods, "--rise-masks", "16", "--lime-samples", "20", "--device", "cpu",
            "--insertion"]
    if HAS_ENGINE:
        args += ["--fgvis-max-iterations", "5"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "auc_per_image.csv")
    n_methods = len(methods.split(","))
    assert len(df) == 2 * n_methods
    assert df["deletion_auc"].between(0, 1).all()
    assert (df["evaluations"] == 206).all()  # step ceil(1024/224) = 5 -> ceil(1024/5) = 205 steps + 1
    assert {"seconds_explain", "seconds_metric", "insertion_auc"} <= set(df.columns)
    md = (out / "summary.md").read_text()
    assert "0.1232" in md and "Research use only" in md and "Grad-CAM" in md
    assert (out / "deletion_curves.png").stat().st_size > 1000
    curves = pd.read_csv(out / "mean_deletion_curves.csv")
    assert curves["fraction_removed"].iloc[0] == 0 and curves["fraction_removed"].iloc[-1] == 1
    meta = json.loads((out / "run.json").read_text())
    assert meta["image_names"] == ["im0.png", "im1.png"]
    assert meta["seconds_in_results"] == pytest.approx((df["seconds_explain"] + df["seconds_metric"]).sum(), abs=0.2)


def _evaluate(app, command: str, folder, out, *options: str):
    """`retina-fgvis evaluate COMMAND --model imagenet --images FOLDER --out OUT OPTIONS...`."""
    return CliRunner().invoke(app, ["evaluate", command, "--model", "imagenet", "--images", str(folder),
                                    "--out", str(out), *options])


def test_faithfulness_time_box_keeps_complete_rows(tiny_setup):
    """--max-minutes 0: the first batch is done (every method), no later batch is started, and
    the outputs say how many images were left out."""
    app, folder, out = tiny_setup
    res = _evaluate(app, "faithfulness", folder, out, "--methods", "gradcam,gradient", "--device", "cpu",
                    "--max-minutes", "0")
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "auc_per_image.csv")
    assert list(df["image"]) == ["im0.png", "im0.png"] and list(df["method"]) == ["gradcam", "gradient"]
    md = (out / "summary.md").read_text()
    assert "Evaluated: 1 images" in md and "1 of 2 images evaluated, the other 1 left out" in md
    meta = json.loads((out / "run.json").read_text())
    assert meta["images_evaluated"] == ["im0.png"] and "--max-minutes 0" in meta["command"]


def _records(out, method: str) -> list:
    return sorted((out / "progress").glob(f"{method}-*/record-*.json"))


def test_faithfulness_resumes_an_interrupted_run(tiny_setup):
    """A time-boxed run keeps its finished image on disk; the same command later evaluates only
    the other one, and the outputs cover both (the resumed rows are the recorded ones)."""
    app, folder, out = tiny_setup
    opts = ("--methods", "gradcam,gradient", "--device", "cpu")
    assert _evaluate(app, "faithfulness", folder, out, *opts, "--max-minutes", "0").exit_code == 0
    first = pd.read_csv(out / "auc_per_image.csv")
    records = _records(out, "gradcam") + _records(out, "gradient")
    assert len(records) == 2 and not any("im0" in str(r) for r in records)  # no identifiers in paths
    # with a complete image on disk, a time box of 0 rewrites the outputs from the records alone
    res = _evaluate(app, "faithfulness", folder, out, *opts, "--max-minutes", "0")
    assert res.exit_code == 0 and "1 of 2 images evaluated, the other 1 left out" in res.output
    pd.testing.assert_frame_equal(pd.read_csv(out / "auc_per_image.csv"), first)
    assert len(_records(out, "gradcam") + _records(out, "gradient")) == 2
    res = _evaluate(app, "faithfulness", folder, out, *opts)
    assert res.exit_code == 0, res.output
    assert "resuming: 2 (image, method) results of earlier runs reused; 1 of 2 images" in res.output
    df = pd.read_csv(out / "auc_per_image.csv")
    assert list(df["image"]) == ["im0.png", "im0.png", "im1.png", "im1.png"]
    pd.testing.assert_frame_equal(df.iloc[:2].reset_index(drop=True), first)  # incl. its timings
    assert "2 (image, method) results taken from earlier runs" in (out / "summary.md").read_text()
    assert json.loads((out / "run.json").read_text())["images_from_earlier_runs"] == 2
    assert len(_records(out, "gradcam")) == 2


def test_faithfulness_changed_settings_recompute_that_method_only_and_restart_discards(tiny_setup):
    app, folder, out = tiny_setup
    base = ("--methods", "gradient,rise", "--device", "cpu")
    assert _evaluate(app, "faithfulness", folder, out, *base, "--rise-masks", "8").exit_code == 0
    before = pd.read_csv(out / "auc_per_image.csv")
    res = _evaluate(app, "faithfulness", folder, out, *base, "--rise-masks", "12")
    assert res.exit_code == 0, res.output
    assert "resuming: 2 (image, method) results" in res.output  # the gradient's, not RISE's
    after = pd.read_csv(out / "auc_per_image.csv")
    g = lambda d: d[d["method"] == "gradient"].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(g(after), g(before))
    assert len(list((out / "progress").glob("rise-*"))) == 2  # both settings kept
    res = _evaluate(app, "faithfulness", folder, out, *base, "--rise-masks", "12", "--restart")
    assert res.exit_code == 0, res.output
    assert "resuming" not in res.output and len(list((out / "progress").glob("rise-*"))) == 1


def test_faithfulness_unreadable_record_is_recomputed(tiny_setup):
    app, folder, out = tiny_setup
    opts = ("--methods", "gradient", "--device", "cpu")
    assert _evaluate(app, "faithfulness", folder, out, *opts).exit_code == 0
    _records(out, "gradient")[0].write_text("{not json")
    res = _evaluate(app, "faithfulness", folder, out, *opts)
    assert res.exit_code == 0, res.output
    assert "unreadable record ignored" in res.output and "resuming: 1 (image, method)" in res.output
    assert len(pd.read_csv(out / "auc_per_image.csv")) == 2


def test_background_substrate_is_the_blurred_image_and_ends_every_curve():
    """substrate="background": removed pixels become the image's median-blurred self, in the
    metric too, so every deletion curve ends at p(class | background), not at p(class | 0)."""
    em = tiny_eval_model()
    rng = np.random.default_rng(1)
    fov = torch.zeros(32, 32, dtype=torch.bool)
    fov[4:28, 4:28] = True
    imgs = [F.EvalImage(name=f"i{i}", tensor=torch.from_numpy(rng.normal(size=(3, 32, 32)).astype(np.float32)),
                        fov=fov) for i in range(2)]
    assert F.substrate_batch(em, imgs, "zero", torch.device("cpu")) is None
    bg = F.substrate_batch(em, imgs, "background", torch.device("cpu"))
    assert bg.shape == (2, 3, 32, 32) and (bg[:, :, ~fov] == 0).all()
    assert bg[:, :, fov].std() < 0.5 * torch.stack([im.tensor for im in imgs])[:, :, fov].std()  # smoothed
    runs = {s: F.run_faithfulness(em, imgs, ["gradient", "occlusion"], batch_size=2, substrate=s)
            for s in F.SUBSTRATES}
    x = torch.stack([im.tensor for im in imgs])
    for s, end_image in (("zero", torch.zeros_like(x)), ("background", bg)):
        probs = torch.softmax(em.model(end_image), 1)
        df = runs[s].per_image
        expected = [float(probs[i, t]) for i, t in zip(range(2), df[df.method == "gradient"]["target"])]
        np.testing.assert_allclose(df[df.method == "gradient"]["p_target_end"], expected, rtol=1e-5)
    assert runs["background"].substrate == "background"
    assert not np.allclose(runs["zero"].per_image["deletion_auc"], runs["background"].per_image["deletion_auc"])
    with pytest.raises(ValueError, match="unknown substrate"):
        F.run_faithfulness(em, imgs, ["gradient"], substrate="grey")


def test_faithfulness_cli_substrate_keeps_its_own_records(tiny_setup):
    """--substrate background: records in their own folders (the zero substrate's hash is the one
    records had before the option existed), the outputs say which substrate, bad values exit 2."""
    app, folder, out = tiny_setup
    opts = ("--methods", "gradient", "--device", "cpu")
    assert _evaluate(app, "faithfulness", folder, out, *opts).exit_code == 0
    res = _evaluate(app, "faithfulness", folder, out, *opts, "--substrate", "background")
    assert res.exit_code == 0, res.output
    assert "resuming" not in res.output
    identities = [json.loads(f.read_text()) for f in sorted((out / "progress").glob("gradient-*/identity.json"))]
    assert len(identities) == 2
    assert sorted(i.get("substrate", "zero") for i in identities) == ["background", "zero"]
    assert "median-blurred background" in (out / "summary.md").read_text()
    meta = json.loads((out / "run.json").read_text())
    assert meta["substrate"] == "background" and "--substrate background" in meta["command"]
    res = _evaluate(app, "faithfulness", folder, out, *opts, "--substrate", "grey")
    assert res.exit_code == 2 and "zero, background" in res.output


@pytest.mark.skipif(not HAS_ENGINE, reason="FGVis engine (retina_fgvis.fgvis.games) not available yet")
def test_faithfulness_cli_reports_the_game_with_and_without_the_defence(tiny_setup):
    """fgvis and fgvis-undefended: same settings, own record folders (the defended game's identity
    is the one it had before the undefended one existed: no new key), a verdict line for each."""
    app, folder, out = tiny_setup
    res = _evaluate(app, "faithfulness", folder, out, "--methods", "gradient,fgvis,fgvis-undefended",
                    "--fgvis-max-iterations", "5", "--device", "cpu")
    assert res.exit_code == 0, res.output
    identities = {json.loads(f.read_text())["method"]: json.loads(f.read_text())
                  for f in (out / "progress").glob("*/identity.json")}
    assert set(identities) == {"gradient", "fgvis", "fgvis-undefended"}
    assert set(identities["fgvis"]) == {"model", "method", "options", "insertion"}
    assert identities["fgvis"]["options"] == identities["fgvis-undefended"]["options"]
    assert identities["fgvis"]["options"]["max_iterations"] == 5
    df = pd.read_csv(out / "auc_per_image.csv")
    assert sorted(df["method"].unique()) == ["fgvis", "fgvis-undefended", "gradient"]
    md = (out / "summary.md").read_text()
    assert "FGVis (deletion game) / best baseline (Gradient (saliency))" in md
    assert "FGVis without the defence / best baseline (Gradient (saliency))" in md
    assert "does not say whether its Table 2 masks" in md
    paired = pd.read_csv(out / "paired_comparison.csv")
    assert set(paired["explained_class"]) >= {"all"}
    paired = paired[paired["explained_class"] == "all"].set_index("method")
    assert list(paired["other"]) == ["gradient", "gradient"] and (paired["n"] == 2).all()
    wide = df.pivot(index="image", columns="method", values="deletion_auc")
    for game in ("fgvis", "fgvis-undefended"):
        assert paired.loc[game, "lower"] == int((wide[game] < wide["gradient"]).sum())
        assert paired.loc[game, "mean_difference"] == pytest.approx((wide[game] - wide["gradient"]).mean(), abs=1e-6)
    assert "Paired by image" in md and "| FGVis without the defence | Gradient (saliency) |" in md


@pytest.mark.skipif(not HAS_ENGINE, reason="FGVis engine (retina_fgvis.fgvis.games) not available yet")
def test_faithfulness_random_control_is_a_reference_line_never_the_best_baseline(tiny_setup):
    """The random order is reported and paired against, but the game's ratio is to the best real
    baseline, and the report names exactly the methods whose mean is not below the control's."""
    app, folder, out = tiny_setup
    res = _evaluate(app, "faithfulness", folder, out, "--methods", "gradient,fgvis,random",
                    "--fgvis-max-iterations", "5", "--device", "cpu")
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "auc_per_image.csv")
    means = df.groupby("method")["deletion_auc"].mean()
    md = (out / "summary.md").read_text()
    assert "FGVis (deletion game) / best baseline (Gradient (saliency))" in md
    line = next(x for x in md.splitlines() if x.startswith("Random order (control): "))
    assert line.startswith(f"Random order (control): {means['random']:.4f}")
    for method, label in (("gradient", "Gradient (saliency)"), ("fgvis", "FGVis (deletion game)")):
        assert (label in line) == (means[method] >= means["random"]), (line, means.to_dict())
    paired = pd.read_csv(out / "paired_comparison.csv")
    assert set(paired.loc[paired["explained_class"] == "all", "other"]) == {"gradient", "random"}


def test_faithfulness_cli_rejects_bad_method(tiny_setup):
    app, folder, out = tiny_setup
    res = _evaluate(app, "faithfulness", folder, out, "--methods", "gradcam,bogus")
    assert res.exit_code != 0
    assert "bogus" in res.output


@pytest.mark.skipif(not HAS_ENGINE, reason="FGVis engine (retina_fgvis.fgvis.games) not available yet")
def test_defense_cli_end_to_end(tiny_setup):
    app, folder, out = tiny_setup
    res = _evaluate(app, "defense", folder, out, "--max-iterations", "20", "--examples", "1", "--device", "cpu")
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "defense_per_image.csv")
    assert len(df) == 2
    assert {"undefended_success", "defended_success", "target", "undefended_p_target"} <= set(df.columns)
    assert (out / "examples" / "example-01.png").exists()
    assert "generated with defence" in (out / "summary.md").read_text()


def test_defense_target_rule_skips_zero_image_class():
    em = tiny_eval_model()
    x = torch.randn(3, 3, 32, 32)
    imgs = [F.EvalImage(name=f"i{i}", tensor=x[i]) for i in range(3)]
    cases, zclass, zprobs, _ = F.defense_cases(em, imgs)
    probs = F.predict(em, x)
    for c, p in zip(cases, probs):
        order = torch.argsort(p)
        expected = int(order[0]) if int(order[0]) != zclass else int(order[1])
        assert c.target == expected != zclass
    assert zprobs.shape == (4,)


def test_rdr_sample_is_balanced_and_deterministic():
    table = pd.DataFrame({"file": [f"f{i}.jpg" for i in range(40)], "source": "s",
                          "rdr": [1] * 10 + [0] * 30, "path": [f"/x/f{i}.jpg" for i in range(40)],
                          "patient": [str(i // 2) for i in range(40)]})
    a = F.sample_rdr(table, 12, seed=0)
    b = F.sample_rdr(table, 12, seed=0)
    assert a.equals(b)
    assert (a["rdr"] == 1).sum() == 6 and len(a) == 12
    assert (F.sample_rdr(table, 30)["rdr"] == 1).sum() == 10  # all positives, then negatives


def _tiny_rdr_model(*_a, **_k) -> F.EvalModel:
    from retina_fgvis.classifier.model import Classifier, TinyNet

    torch.manual_seed(0)
    net = TinyNet(2).eval()
    with torch.no_grad():
        net.classifier.bias.copy_(torch.tensor([3.0, -3.0]))  # confidently "non-referable"
    for p in net.parameters():
        p.requires_grad_(False)
    meta = {"arch": "tiny", "input_size": 48, "mean": [0.5] * 3, "std": [0.5] * 3,
            "class_names": ["non-referable", "referable"], "threshold": 0.5}
    clf = Classifier(model=net, metadata=meta)
    return F.EvalModel(kind="rdr", model=net, mean=clf.mean, std=clf.std, input_size=48,
                       class_names=meta["class_names"], description="tiny RDR test net", classifier=clf)


@pytest.fixture()
def tiny_rdr_data(tmp_path, monkeypatch):
    """Synthetic data root with the two sources' layout (labels.csv + images)."""
    from tests._fundus_synth import synthetic_fundus

    root = tmp_path / "data"
    for src in ("odir5k_512", "eyepacs1098_400"):
        (root / src / "images").mkdir(parents=True)
        rows = []
        for pat in range(4):
            for eye in ("left", "right"):
                name = f"images/{pat}_{eye}.jpg"
                Image.fromarray(synthetic_fundus(80, 80, lesions=pat % 2, seed=pat)).save(root / src / name)
                rows.append({"file": name, "grade": 2 * (pat % 2), "rdr": pat % 2, "patient": pat, "eye": eye})
        pd.DataFrame(rows).to_csv(root / src / "labels.csv", index=False)
    monkeypatch.setattr(F, "load_eval_model", _tiny_rdr_model)
    from retina_fgvis.cli import app

    return app, root, tmp_path / "out"


def test_rdr_validation_split_is_the_classifiers(tiny_rdr_data):
    _, root, _ = tiny_rdr_data
    from retina_fgvis.classifier.data import build_split

    val = F.rdr_validation_table(None, root)
    ref = build_split([root / "odir5k_512", root / "eyepacs1098_400"], [0.2, 0.5], seed=0)
    assert sorted(val["path"]) == sorted(ref.loc[ref["val"], "path"])
    with pytest.raises(ValueError, match="fingerprint"):
        F.rdr_validation_table({"training_data": [{"source": "odir5k_512", "folder": "x", "val_fraction": 0.2}],
                                "split_fingerprint": "0000"}, root)


@pytest.mark.skipif(not HAS_ENGINE, reason="FGVis engine (retina_fgvis.fgvis.games) not available yet")
def test_rdr_cli_paths(tiny_rdr_data):
    app, root, out = tiny_rdr_data
    res = CliRunner().invoke(app, ["evaluate", "faithfulness", "--model", "rdr", "--data-root", str(root),
                                   "--limit", "2", "--methods", "gradient,fgvis", "--fgvis-max-iterations", "5",
                                   "--out", str(out / "f"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "f" / "auc_per_image.csv")
    assert len(df) == 4 and set(df["label"]) <= {0, 1}
    res = CliRunner().invoke(app, ["evaluate", "defense", "--model", "rdr", "--data-root", str(root),
                                   "--limit", "2", "--max-iterations", "10", "--out", str(out / "d"),
                                   "--device", "cpu", "--max-p-referable", "0.5"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "d" / "defense_per_image.csv")
    assert len(df) == 2 and (df["target"] == 1).all() and (df["label"] == 0).all()


def test_faithfulness_cli_default_methods_are_every_method():
    """The CLI spells its default out (it does not import torch at import time); it must stay the
    library's full list, in the library's order."""
    import inspect

    from retina_fgvis.baselines import METHODS
    from retina_fgvis.commands.faithfulness import faithfulness_command

    default = inspect.signature(faithfulness_command).parameters["methods"].default.default
    assert tuple(default.split(",")) == METHODS


def test_reports_show_paths_below_the_working_directory_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    assert F.shown_path(tmp_path / "weights" / "w.pt") == "weights/w.pt"
    outside = tmp_path.parent / "elsewhere.pt"
    assert F.shown_path(outside) == str(outside)


@pytest.fixture()
def wide_errors(monkeypatch):
    """Typer's usage-error panel as wide as the message: a long tmp path is not wrapped mid-text."""
    monkeypatch.setattr("typer.rich_utils.MAX_WIDTH", 400)


@pytest.mark.parametrize("command, methods", [("faithfulness", "fgvis"), ("faithfulness", "random"),
                                              ("defense", None)])
@pytest.mark.parametrize("setting, message", [("foo=1", "unknown setting(s) foo (known: optimizer"),
                                              ("lr=-1", "lr must be a number > 0, got -1"),
                                              ("goal=bogus", "unknown goal 'bogus'")])
def test_fgvis_settings_are_checked_upfront_whatever_the_methods(tiny_setup, wide_errors, command, methods,
                                                                 setting, message):
    """An unknown key ended in a TypeError once the game ran, and was accepted silently when no
    FGVis method ran (and by `defense`): now a usage error before any model or image is loaded."""
    app, folder, out = tiny_setup
    extra = ["--methods", methods] if methods else []
    res = _evaluate(app, command, folder, out, *extra, "--device", "cpu", "--fgvis-setting", setting)
    assert res.exit_code == 2, res.output
    assert f"Invalid value for --fgvis-setting: {message}" in res.output
    assert not out.exists()


def test_defense_with_no_readable_image_says_so(tmp_path, monkeypatch):
    """Every image skipped as unreadable: the error names that, not the selection rule."""
    monkeypatch.setattr(F, "load_eval_model", _tiny_rdr_model)
    from retina_fgvis.cli import app

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_text("not an image")
    res = CliRunner().invoke(app, ["evaluate", "defense", "--model", "rdr", "--images", str(folder), "--limit", "1",
                                   "--device", "cpu", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert lines[-1] == f"error: {folder}: no usable images (1 skipped, see above)", res.output
    assert lines[0].startswith(f"skipped {folder / 'a.png'}: ")
    assert "selection rule" not in res.output and not (tmp_path / "out").exists()


def _add_bad_images(folder) -> dict[str, str]:
    """A text file named .png and a PNG cut in half beside the good images: file -> expected reason."""
    (folder / "zz_bad.png").write_text("not an image")
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(buf, format="PNG")
    (folder / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return {str(folder / "cut.png"): "cannot decode image (image file is truncated",
            str(folder / "zz_bad.png"): "not an image file PIL can read"}


TINY_RUN = {"faithfulness": ("--methods", "gradient", "--device", "cpu"),
            "defense": ("--max-iterations", "2", "--examples", "0", "--device", "cpu")}


@pytest.mark.parametrize("command", ["faithfulness", "defense"])
def test_imagenet_folder_skips_unreadable_images_and_the_outputs_name_them(tiny_setup, command):
    """One bad file (not an image, truncated) used to end the whole run (exit 2, the truncated
    one without its name): now each is skipped with a line naming it, and summary.md and
    run.json say which files the numbers do not cover."""
    app, folder, out = tiny_setup
    bad = _add_bad_images(folder)
    res = _evaluate(app, command, folder, out, *TINY_RUN[command])
    assert res.exit_code == 0, res.output
    for file, reason in bad.items():
        assert f"skipped {file}: {reason}" in res.output
    meta = json.loads((out / "run.json").read_text())
    assert [s["file"] for s in meta["skipped_images"]] == list(bad)
    assert all(s["reason"].startswith(bad[s["file"]]) for s in meta["skipped_images"])
    md = (out / "summary.md").read_text()
    assert "2 input file(s) skipped" in md and "zz_bad.png" in md and "cut.png" in md
    table = "auc_per_image.csv" if command == "faithfulness" else "defense_per_image.csv"
    assert sorted(set(pd.read_csv(out / table)["image"])) == ["im0.png", "im1.png"]


@pytest.mark.parametrize("command", ["faithfulness", "defense"])
def test_imagenet_folder_without_a_usable_image_is_one_line_naming_it(tiny_setup, command):
    app, folder, out = tiny_setup
    for good in folder.glob("im*.png"):
        good.unlink()
    _add_bad_images(folder)
    res = _evaluate(app, command, folder, out, *TINY_RUN[command])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert [x.split(":")[0] for x in lines[:-1]] == [f"skipped {folder / 'cut.png'}", f"skipped {folder / 'zz_bad.png'}"]
    assert lines[-1] == f"error: {folder}: no usable images (2 skipped, see above)"
    assert not out.exists()


def test_rdr_faithfulness_outputs_name_the_skipped_images(tiny_rdr_data, tmp_path):
    """--model rdr skipped bad files on the console only; summary.md and run.json said
    "2 fundus images from ..." as if the folder held nothing else."""
    import shutil

    app, root, out = tiny_rdr_data
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("0_left.jpg", "1_left.jpg"):
        shutil.copy(root / "odir5k_512" / "images" / name, folder / name)
    bad = _add_bad_images(folder)
    res = CliRunner().invoke(app, ["evaluate", "faithfulness", "--model", "rdr", "--images", str(folder),
                                   "--methods", "gradient", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "run.json").read_text())
    assert sorted(s["file"] for s in meta["skipped_images"]) == sorted(bad)
    assert all(s["reason"] for s in meta["skipped_images"])
    assert "2 input file(s) skipped" in (out / "summary.md").read_text()
    assert len(pd.read_csv(out / "auc_per_image.csv")) == 2
