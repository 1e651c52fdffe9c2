"""``retina-fgvis evaluate faithfulness`` (deletion metric, paper Table 2) and
``retina-fgvis evaluate defense`` (adversarial-evidence defence, paper Table 1 / Fig. 3).

Thin: parses options, picks images, calls :mod:`retina_fgvis.faithfulness`, writes files
atomically and prints progress. The recorded runs live in ``evaluation/faithfulness/`` and
``evaluation/defense/`` (their README holds the exact commands).
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Optional

import typer

from retina_fgvis.commands.checks import fail, output_folder, resolve_device
from retina_fgvis.commands.fgvis_options import check_fgvis_settings, parse_fgvis_settings
from retina_fgvis.report.files import atomic_write_bytes, atomic_write_text, atomic_write_figure, sha256_hex
from retina_fgvis.skipped import SkippedImage

MODEL_HELP = "Model to evaluate: 'rdr' (the referable-DR classifier) or 'imagenet' (EfficientNet-Lite0)."
IMAGES_HELP = ("Folder of images. Default: rdr -> held-out validation images of ../shared/data "
               "(classifier split, patient-wise, seed 0); imagenet -> the 5 natural photographs of "
               "skimage.data.")


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _write_csv(path: Path, df) -> None:
    _write_text(path, df.to_csv(index=False, float_format="%.6g"))


def _environment(device: str) -> dict[str, Any]:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
           "platform": platform.platform()}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import captum
        import timm

        env["captum"], env["timm"] = captum.__version__, timm.__version__
    except Exception:  # noqa: BLE001
        pass
    return env


def _command(name: str, **opts: Any) -> str:
    """The equivalent command line (recorded in summary.md / run.json)."""
    parts = ["retina-fgvis", "evaluate", name]
    for k, v in opts.items():
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {v}")
    return " ".join(parts)


def _load(model: str, weights: Optional[Path], device: str):
    from retina_fgvis import faithfulness as F

    try:
        return F.load_eval_model(model, weights, device)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))


class _Skips:
    """The images the loaders skipped: each printed as it happens (``skipped <file>: <reason>``),
    then named in the outputs, so a run's numbers never look like they cover the whole folder."""

    def __init__(self) -> None:
        self.items: list[SkippedImage] = []

    def __call__(self, skip: SkippedImage) -> None:
        self.items.append(skip)
        _echo(str(skip))

    def to_json(self) -> list[dict[str, str]]:
        return [s.to_json() for s in self.items]

    def no_usable_images(self, where: Path) -> str:
        """The one-line error when nothing was left: which folder, and that the skips say why."""
        return f"{where}: {NO_USABLE_IMAGES} ({len(self.items)} skipped, see above)"


def _faithfulness_images(em, images: Optional[Path], data_root: Optional[Path], limit: Optional[int],
                         seed: int, skips: _Skips):
    from retina_fgvis import faithfulness as F

    if em.kind == "imagenet":
        imgs = F.imagenet_images(em, images, limit, on_error=skips)
        desc = (f"{len(imgs)} images from {images}" if images else
                f"{len(imgs)} natural photographs from skimage.data ({', '.join(i.name for i in imgs)}): "
                "a small sample, not the ImageNet validation set")
        return imgs, desc
    if images is not None:
        imgs = F.rdr_images(em, images, limit, on_error=skips)
        return imgs, f"{len(imgs)} fundus images from {images}"
    table = F.rdr_validation_table(em.classifier.metadata, data_root)
    sample = F.sample_rdr(table, limit if limit else 60, seed=seed, balanced=True)
    imgs = F.rdr_images(em, sample, on_error=skips)
    n_pos = sum(1 for i in imgs if i.label == 1)
    return imgs, (f"{len(imgs)} held-out validation images ({n_pos} referable, {len(imgs) - n_pos} not; "
                  f"the classifier's patient-wise held-out split, sample seed {seed})")


def _image_source(images: Optional[Path], data_root: Optional[Path]) -> Path:
    """Where the images came from (named by the 'no usable images' error)."""
    from retina_fgvis import faithfulness as F

    return images if images is not None else (data_root if data_root is not None else F.default_data_root())


PROGRESS_DIR = "progress"
#: when every image was skipped as unreadable (each skip is reported above this line)
NO_USABLE_IMAGES = "no usable images"
#: figures of the defence examples, one per case, kept beside its records (see _defense_figure_file)
FIGURE_PREFIX = "figure-"


def _model_id(em) -> str:
    """The model in a record folder's identity: the checkpoint's hash, not its path (runs move)."""
    return str(getattr(em.classifier, "sha256", "") or em.description)


def _progress_folder(progress_dir: Path, name: str, identity: dict[str, Any]) -> Path:
    """progress/NAME-HASH/ with its identity.json: the hash of everything a record depends on, so
    a record is only ever reused by a run that would compute the same thing."""
    identity = json.loads(json.dumps(identity, default=str, sort_keys=True))
    digest = sha256_hex(json.dumps(identity, sort_keys=True))[:12]
    folder = progress_dir / f"{name}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    _write_text(folder / "identity.json", json.dumps(identity, indent=2) + "\n")
    return folder


def _full_fgvis_settings(options: dict[str, Any]) -> dict[str, Any]:
    """Every engine setting, defaults included: a changed default is a new record folder."""
    from dataclasses import asdict

    from retina_fgvis.fgvis.games import FGVisSettings

    return asdict(FGVisSettings(**options).validate())


def _method_folder(progress_dir: Path, em, method: str, options: dict[str, Any], insertion: bool,
                   substrate: str = "zero") -> Path:
    """progress/METHOD-HASH/: one folder per method *and* its settings (model, options, insertion,
    substrate; the protocol's zero substrate is left out of the hash, so records written before
    the substrate option existed stay valid).

    Why a hash of the settings: a record is reused only by a run that would compute the same
    thing, and changing one method's settings (say FGVis's) leaves the other methods' records
    usable, so the expensive baselines are not recomputed.
    """
    from retina_fgvis.baselines import FGVIS_METHODS

    method_options = options.get(method, {})
    if method in FGVIS_METHODS:
        method_options = _full_fgvis_settings(method_options)
    identity = {"model": _model_id(em), "method": method, "options": method_options, "insertion": insertion}
    if substrate != "zero":
        identity["substrate"] = substrate
    return _progress_folder(progress_dir, method, identity)


def _record_file(folder: Path, image_name: str) -> Path:
    """One file per image, named by a hash: image names can hold patient identifiers."""
    import hashlib

    return folder / f"record-{hashlib.sha256(image_name.encode()).hexdigest()[:16]}.json"


def _read_records(folder: Path, from_json) -> list:
    """The records an earlier run left in ``folder``; an unreadable one is skipped (recomputed)."""
    records = []
    for f in sorted(folder.glob("record-*.json")):
        try:
            records.append(from_json(json.loads(f.read_text())))
        except (OSError, ValueError, KeyError, TypeError) as exc:  # ValueError: bad JSON
            _echo(f"warning: {f}: unreadable record ignored ({exc}); that result is computed again")
    return records


def _load_records(folders: dict[str, Path]) -> list:
    """Records earlier runs left in the methods' folders; an unreadable one is skipped (recomputed)."""
    from retina_fgvis.faithfulness import MethodRecord

    return [rec for method, folder in folders.items() for rec in _read_records(folder, MethodRecord.from_json)
            if rec.method == method]


def faithfulness_command(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    images: Optional[Path] = typer.Option(None, "--images", help=IMAGES_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most N images (rdr default: 60, balanced)."),
    methods: str = typer.Option("gradcam,occlusion,lime,rise,gradient,fgvis,fgvis-undefended,random", "--methods",
                                help="Comma-separated methods."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="rdr: classifier checkpoint (default: the project's)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="rdr: folder with odir5k_512/ and eyepacs1098_400/."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Images per explain call."),
    insertion: bool = typer.Option(False, "--insertion/--no-insertion", help="Also compute the insertion metric."),
    rise_masks: int = typer.Option(4000, "--rise-masks", min=1, help="RISE: number of random masks."),
    lime_samples: int = typer.Option(500, "--lime-samples", min=1, help="LIME: number of perturbed samples."),
    fgvis_max_iterations: Optional[int] = typer.Option(None, "--fgvis-max-iterations", min=1,
                                                       help="FGVis: iteration cap (default: the engine's)."),
    fgvis_setting: list[str] = typer.Option([], "--fgvis-setting",
                                            help="FGVis setting override KEY=VALUE (repeatable), on top of "
                                                 "the faithfulness defaults (goal=fraction)."),
    seed: int = typer.Option(0, "--seed", help="Sample seed (rdr)."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", min=0.0,
                                                help="Start no new batch after this many minutes "
                                                     "(a lent machine's time box); the outputs cover the "
                                                     "images done and say how many were left out."),
    substrate: str = typer.Option("zero", "--substrate",
                                  help="What removed pixels become, in the metric and in every method that "
                                       "removes pixels: zero (the paper's protocol: the data-mean colour) or "
                                       "background (each image's median-blurred self: no grey, lesion-like "
                                       "spots on a fundus)."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="Run the model with NHWC weights (default: on a CPU, "
                                                      "where it is faster; maps agree up to float rounding, "
                                                      "each result row names its layout)."),
    resume: bool = typer.Option(True, "--resume/--restart",
                                help="Reuse the results earlier runs left in OUT/progress for the same model, "
                                     "method and method settings (default), or discard them all."),
) -> None:
    """Deletion metric of FGVis and the baselines (paper Table 2): CSV, table, curves, run times.

    Each (image, method) result is written to OUT/progress as soon as it is done, so an
    interrupted run keeps it and the same command continues where it stopped.
    Research use only, not a diagnosis.
    """
    from retina_fgvis import faithfulness as F
    from retina_fgvis.baselines import FGVIS_METHODS, METHODS

    if model not in ("rdr", "imagenet"):
        raise typer.BadParameter("use rdr or imagenet", param_hint="--model")
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if bad or not chosen:
        raise typer.BadParameter(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}",
                                 param_hint="--methods")
    if substrate not in F.SUBSTRATES:
        raise typer.BadParameter(f"use one of {', '.join(F.SUBSTRATES)}", param_hint="--substrate")
    dev = resolve_device(device)
    output_folder(out)
    # checked whatever the methods: an unknown key used to fail only when an FGVis method ran
    # (after the baselines) and to be accepted silently when none did
    fgvis_options = check_fgvis_settings({**F.FAITHFULNESS_FGVIS_SETTINGS, **parse_fgvis_settings(fgvis_setting)})
    if fgvis_max_iterations is not None:
        fgvis_options["max_iterations"] = fgvis_max_iterations
    em = _load(model, weights, dev)
    skips = _Skips()
    try:
        imgs, image_desc = _faithfulness_images(em, images, data_root, limit, seed, skips)
    except (ValueError, OSError) as exc:  # a folder without images, RDR data not found
        fail(str(exc))
    if not imgs:
        fail(skips.no_usable_images(_image_source(images, data_root)))
    options: dict[str, dict[str, Any]] = {
        "rise": {"n_masks": rise_masks},
        "lime": {"n_samples": lime_samples, "mean": em.mean, "std": em.std},  # SLIC on true colours
    }
    for m in FGVIS_METHODS:  # the defended and the undefended game play with the same settings
        options[m] = dict(fgvis_options)
    cmd = _command("faithfulness", model=model, images=images, limit=limit, methods=",".join(chosen),
                   weights=weights, data_root=data_root, device=device, batch_size=batch_size,
                   insertion=insertion, rise_masks=rise_masks, lime_samples=lime_samples,
                   fgvis_max_iterations=fgvis_max_iterations,
                   fgvis_setting=" --fgvis-setting ".join(fgvis_setting) or None,
                   seed=seed if seed else None, max_minutes=max_minutes,
                   substrate=None if substrate == "zero" else substrate,
                   channels_last=channels_last is True, no_channels_last=channels_last is False, out=out)
    _echo(f"{em.description}; {image_desc}; methods {', '.join(chosen)}; device {dev}")
    t0 = time.time()
    progress_dir = out / PROGRESS_DIR
    if not resume and progress_dir.exists():
        import shutil

        shutil.rmtree(progress_dir)
    folders = {m: _method_folder(progress_dir, em, m, options, insertion, substrate) for m in chosen}
    previous = _load_records(folders)

    def keep(record) -> None:
        _write_text(_record_file(folders[record.method], record.image), json.dumps(record.to_json()) + "\n")

    try:
        run = F.run_faithfulness(em, imgs, chosen, options, batch_size=batch_size, with_insertion=insertion,
                                 progress=_echo, time_budget_s=None if max_minutes is None else 60 * max_minutes,
                                 previous=previous, on_record=keep, substrate=substrate,
                                 channels_last=channels_last)
    except ValueError as exc:
        fail(str(exc))
    if skips.items:
        run.notes.append(F.skipped_note(skips.items))
    _write_csv(out / "auc_per_image.csv", run.per_image)
    summary = F.faithfulness_summary(run)
    _write_csv(out / "summary.csv", summary)
    _write_csv(out / "paired_comparison.csv", F.faithfulness_paired(run))
    _write_csv(out / "mean_deletion_curves.csv", F.mean_curves_table(run))
    _write_text(out / "summary.md", F.faithfulness_markdown(run, em.description, image_desc, cmd))
    atomic_write_figure(out / "deletion_curves.png", F.curves_figure(run))
    meta = {"command": cmd, "model": em.description, "images": image_desc,
            "image_names": [i.name for i in imgs], "skipped_images": skips.to_json(),
            "images_evaluated": sorted(run.per_image["image"].unique().tolist()), "notes": run.notes,
            "images_from_earlier_runs": run.resumed,
            "methods": chosen, "method_options": options, "substrate": substrate,
            "seconds_total": round(time.time() - t0, 1),
            # this invocation's time says nothing once results are reused; the records keep theirs
            "seconds_in_results": round(float(run.per_image[["seconds_explain", "seconds_metric"]].to_numpy().sum()), 1),
            "environment": _environment(dev),
            "note": F.RESEARCH_NOTE}
    _write_text(out / "run.json", json.dumps(meta, indent=2, default=str) + "\n")
    for r in summary.itertuples():
        _echo(f"{r.label:32s} deletion AUC {r.deletion_auc_mean:.4f}  ({r.seconds_explain_per_image:.1f} s/image)")
    _echo(f"wrote {out}/summary.md")


def _defense_cases(em, images: Optional[Path], data_root: Optional[Path], limit: Optional[int],
                   seed: int, min_confidence: float, max_p_referable: float, skips: _Skips):
    from retina_fgvis import faithfulness as F

    if em.kind == "imagenet" or images is not None:
        imgs = (F.imagenet_images(em, images, on_error=skips) if em.kind == "imagenet"
                else F.rdr_images(em, images, on_error=skips))
        if not imgs:  # every file was skipped: say so, not that the selection rule excluded them
            raise ValueError(skips.no_usable_images(_image_source(images, data_root)))
        cases, zc, zp, notes = F.defense_cases(em, imgs, min_confidence=min_confidence,
                                               max_p_target=max_p_referable)
        cases = cases[:limit] if limit else cases
        src = (f"the {len(imgs)} natural photographs of skimage.data (a small sample)" if em.kind == "imagenet"
               and images is None else f"{len(imgs)} images from {images}")
        return cases, zc, zp, notes, f"{len(cases)} of {src}"
    # RDR, held-out validation data: confidently non-referable eyes, until `limit` are found.
    want = limit if limit else 100
    table = F.rdr_validation_table(em.classifier.metadata, data_root)
    table = F.sample_rdr(table[table["rdr"] == 0], None, seed=seed, balanced=False)
    cases: list = []
    notes: list[str] = []
    zc, zp, seen = -1, None, 0
    for start in range(0, len(table), 16):
        if len(cases) >= want:
            break
        imgs = F.rdr_images(em, table.iloc[start : start + 16], on_error=skips)
        seen += len(imgs)
        got, zc, zp, notes = F.defense_cases(em, imgs, max_p_target=max_p_referable)
        cases.extend(got)
    if not seen:
        raise ValueError(skips.no_usable_images(_image_source(images, data_root)))
    cases = cases[:want]
    notes = [n for n in notes if "did not meet" not in n]
    desc = (f"{len(cases)} held-out validation eyes graded non-referable with p(referable) <= "
            f"{max_p_referable} (from {seen} examined; the classifier's patient-wise held-out split)")
    return cases, zc, zp, notes, desc


def _defense_folder(out: Path, em, settings: dict[str, Any], resume: bool) -> Path:
    """OUT/progress/defense-HASH/: the records of this model and these FGVis settings (every
    engine setting, defaults included). ``--restart`` discards every defence folder (only
    those: a faithfulness run may share OUT/progress)."""
    import shutil

    progress_dir = out / PROGRESS_DIR
    if not resume:
        for old in progress_dir.glob("defense-*"):
            shutil.rmtree(old)
    identity = {"model": _model_id(em), "protocol": "defense", "settings": _full_fgvis_settings(settings)}
    return _progress_folder(progress_dir, "defense", identity)


def _defense_figure_file(folder: Path, fingerprint: str) -> Path:
    """A case's figure, named by its fingerprint (image, FOV, target), never by its file name."""
    return folder / f"{FIGURE_PREFIX}{fingerprint[:16]}.png"


def _publish_examples(out: Path, figures: list[Path]) -> None:
    """OUT/examples/example-NN.png = the current run's figures, and only those: an
    ``example-*.png`` of an earlier run with more ``--examples`` is removed (nothing else is)."""
    folder = out / "examples"
    current = set()
    for i, src in enumerate(figures, 1):
        name = f"example-{i:02d}.png"
        if not src.is_file():
            _echo(f"warning: {src}: figure missing; {name} not written (run again to redraw it)")
            continue
        atomic_write_bytes(folder / name, src.read_bytes())
        current.add(name)
    for stale in folder.glob("example-*.png") if folder.is_dir() else ():
        if stale.name not in current:
            stale.unlink()


def _defense_meta(cmd: str, em, desc: str, settings: dict[str, Any], run, skips: _Skips, seconds: float,
                  dev: str) -> dict[str, Any]:
    """run.json of a defence run."""
    from retina_fgvis import faithfulness as F

    df = run.per_image
    return {"command": cmd, "model": em.description, "images": desc, "fgvis_settings": settings,
            "generated_without_defence": float(df["undefended_success"].mean()),
            "generated_with_defence": float(df["defended_success"].mean()),
            "confidently_generated_without_defence": float(df["undefended_confident"].mean()),
            "confidently_generated_with_defence": float(df["defended_confident"].mean()),
            "confident_level": F.CONFIDENT_LEVEL, "n": len(df),
            "results_from_earlier_runs": run.resumed, "skipped_images": skips.to_json(),
            "notes": run.notes, "seconds_total": round(seconds, 1),
            "environment": _environment(dev), "note": F.RESEARCH_NOTE}


def defense_command(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    images: Optional[Path] = typer.Option(None, "--images", help=IMAGES_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most N images (rdr default: 100)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="rdr: classifier checkpoint."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="rdr: folder with odir5k_512/ and eyepacs1098_400/."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images per FGVis call."),
    min_confidence: float = typer.Option(0.0, "--min-confidence", min=0.0, max=1.0,
                                         help="imagenet: keep images whose top class has at least this "
                                              "probability (paper: 0.995 on the true class)."),
    max_p_referable: float = typer.Option(0.05, "--max-p-referable", min=0.0, max=1.0,
                                          help="rdr: 'confidently non-referable' = p(referable) <= this."),
    max_iterations: Optional[int] = typer.Option(None, "--max-iterations", min=1,
                                                 help="FGVis iteration cap (default: the engine's)."),
    fgvis_setting: list[str] = typer.Option([], "--fgvis-setting",
                                            help="FGVis setting override KEY=VALUE (repeatable), on top of "
                                                 "the protocol's lambda_schedule=fixed, lambda_init=0."),
    examples: int = typer.Option(4, "--examples", min=0, help="Figures (paper Fig. 3) for the first N images."),
    seed: int = typer.Option(0, "--seed", help="Sample seed (rdr)."),
    resume: bool = typer.Option(True, "--resume/--restart",
                                help="Reuse the games earlier runs left in OUT/progress for the same model, "
                                     "FGVis settings and images (default), or discard them."),
) -> None:
    """Can FGVis generate a class with no evidence? Rate with and without the defence (paper Table 1).

    Each (image, game) result is written to OUT/progress as soon as it is done, so an
    interrupted run keeps it and the same command continues where it stopped.
    Research use only, not a diagnosis."""
    from retina_fgvis import faithfulness as F

    if model not in ("rdr", "imagenet"):
        raise typer.BadParameter("use rdr or imagenet", param_hint="--model")
    dev = resolve_device(device)
    output_folder(out)
    settings = check_fgvis_settings({**F.DEFENSE_FGVIS_SETTINGS, **parse_fgvis_settings(fgvis_setting)})
    if max_iterations is not None:
        settings["max_iterations"] = max_iterations
    em = _load(model, weights, dev)
    skips = _Skips()
    try:
        cases, zc, zp, notes, desc = _defense_cases(em, images, data_root, limit, seed, min_confidence,
                                                    max_p_referable, skips)
    except (ValueError, OSError) as exc:  # no usable image, a folder without images, RDR data not found
        fail(str(exc))
    if not cases:
        fail("no image meets the selection rule (see --min-confidence / --max-p-referable)")
    if skips.items:
        notes = [*notes, F.skipped_note(skips.items)]
    cmd = _command("defense", model=model, images=images, limit=limit, weights=weights, data_root=data_root,
                   device=device, batch_size=batch_size,
                   min_confidence=min_confidence if min_confidence else None,
                   max_p_referable=max_p_referable if model == "rdr" else None,
                   max_iterations=max_iterations, fgvis_setting=" --fgvis-setting ".join(fgvis_setting) or None,
                   examples=examples, seed=seed if seed else None, out=out)
    _echo(f"{em.description}; {desc}; device {dev}")
    t0 = time.time()
    folder = _defense_folder(out, em, settings, resume)
    shown = [F.case_fingerprint(c) for c in cases[:examples]]  # the figures' cases
    figures = [_defense_figure_file(folder, fp) for fp in shown]
    drawn = {fp for fp, f in zip(shown, figures) if f.is_file()}  # kept by an earlier run

    def keep(record) -> None:
        _write_text(_record_file(folder, f"{record.game}/{record.image}"), json.dumps(record.to_json()) + "\n")

    def draw(example: dict[str, Any]) -> None:
        atomic_write_figure(_defense_figure_file(folder, example["fingerprint"]), F.defense_figure(example, em.mean, em.std))

    run = F.run_defense(em, cases, settings, batch_size=batch_size, n_examples=examples, progress=_echo,
                        zero_image_class=zc, zero_image_probs=zp, notes=notes,
                        previous=_read_records(folder, F.DefenseRecord.from_json), on_record=keep, on_example=draw,
                        examples_done=drawn)
    _write_csv(out / "defense_per_image.csv", run.per_image)
    _write_text(out / "summary.md", F.defense_markdown(run, em.description, desc, settings, cmd))
    _publish_examples(out, figures)
    meta = _defense_meta(cmd, em, desc, settings, run, skips, time.time() - t0, dev)
    _write_text(out / "run.json", json.dumps(meta, indent=2, default=str) + "\n")
    _echo(f"adversarial class generated: without defence {100 * meta['generated_without_defence']:.1f} %, "
          f"with defence {100 * meta['generated_with_defence']:.1f} % (n = {meta['n']})")
    _echo(f"wrote {out}/summary.md")


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    evaluate_app.command("faithfulness")(faithfulness_command)
    evaluate_app.command("defense")(defense_command)
