"""CLI: `train`, `predict`, `evaluate classifier`.

`evaluate classifier` is the command that reproduces every number of weights/README.md: it
rebuilds the patient-wise split from the checkpoint's metadata (folders, validation fractions,
seed), checks the split fingerprint, and scores the held-out images through the same
read -> prepare -> predict path a user gets.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

import typer

from retina_fgvis.report.files import atomic_write_text

RESEARCH = "Research use only, not a diagnosis."


def _rich_progress_factory():
    """Progress bars on a terminal; nothing (the trainer logs lines) when redirected to a file."""
    if not sys.stderr.isatty():
        return lambda it, total=None, description="": it
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    def wrap(it: Iterable, total: int | None = None, description: str = ""):
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as prog:
            task = prog.add_task(description, total=total)
            for item in it:
                yield item
                prog.advance(task)

    return wrap


def _log_factory(log_file: Optional[Path]):
    fh = open(log_file, "a", buffering=1) if log_file else None

    def log(msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        print(line, flush=True)
        if fh:
            fh.write(line + "\n")

    return log


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        data: list[Path] = typer.Option(..., "--data", help="Folder with labels.csv (file,rdr,patient); repeat for several sources."),
        out: Path = typer.Option(Path("weights/rdr-effnet-lite0.pt"), "--out", help="Final checkpoint (+ .sha256)."),
        val_fraction: list[float] = typer.Option([0.2], "--val-fraction", help="Patient share held out for validation: one value, or one per --data."),
        arch: str = typer.Option("tf_efficientnet_lite0", help="timm name, 'torchvision:<name>' or 'tiny'."),
        stages: str = typer.Option("384:2:5e-4,512:1:1e-4", help="Progressive resizing: size:epochs:peak_lr,..."),
        batch_size: int = typer.Option(16, min=1),
        seed: int = typer.Option(0, help="Split + training seed."),
        min_sensitivity: float = typer.Option(0.85, min=0.0, max=1.0, help="Operating point: highest threshold with validation sensitivity >= this."),
        checkpoint_dir: Optional[Path] = typer.Option(None, help="Per-epoch checkpoints + resume state (default: runs/<out stem>/)."),
        cache_dir: Optional[Path] = typer.Option(None, help="Preprocessed image cache (default: <checkpoint-dir>/cache)."),
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
        threads: int = typer.Option(2, min=1, help="CPU threads for torch."),
        max_images: Optional[int] = typer.Option(None, min=1, help="Use at most N images per source (smoke runs)."),
        no_pretrained: bool = typer.Option(False, "--no-pretrained", help="Random init even for lite0."),
        freeze_early: int = typer.Option(2, help="Freeze the stem + this many early blocks (0 = train all)."),
        rotate: float = typer.Option(180.0, help="Augmentation: random rotation range +-degrees."),
        init_from: Optional[Path] = typer.Option(None, help="Start from this classifier checkpoint (continue training with new stages)."),
        delete_prob: float = typer.Option(0.0, min=0.0, max=1.0, help="Deletion-aware augmentation: share of samples with a random smooth deletion (label kept)."),
        blank_prob: float = typer.Option(0.0, min=0.0, max=1.0, help="Share of samples replaced by a fully deleted eye labelled non-referable."),
        log_file: Optional[Path] = typer.Option(None, help="Append log lines here as well."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out checkpoint."),
        allow_other_split: bool = typer.Option(False, "--allow-other-split", help="Accept an --init-from checkpoint trained on another split (its training images may then be in this run's validation set)."),
    ) -> None:
        """Train the referable-DR classifier (resumes automatically from --checkpoint-dir).

        An existing --out is never replaced without --overwrite: --out defaults to the shipped
        weights, and a forgotten --out on a smoke run used to replace the shipped model with a toy.
        Resuming an interrupted run whose final --out was not written yet needs no flag.
        Research use only, not a diagnosis.
        """
        from retina_fgvis.classifier.train import TrainConfig, train
        from retina_fgvis.commands.checks import output_file, output_folder, resolve_device

        for v in val_fraction:
            if not 0.0 < v < 1.0:
                raise typer.BadParameter(f"{v:g} is not between 0 and 1 (exclusive): the patient share "
                                         f"held out for validation", param_hint="--val-fraction")
        if len(val_fraction) not in (1, len(data)):
            raise typer.BadParameter(f"{len(val_fraction)} values for {len(data)} --data folders: give one, "
                                     f"or one per --data folder", param_hint="--val-fraction")
        device = resolve_device(device)
        output_file(out, "--out")
        if out.exists() and not overwrite:
            raise typer.BadParameter(f"{out}: exists; pass --overwrite to replace it", param_hint="--out")
        if log_file:
            output_file(log_file, "--log-file", appended=True)

        cfg = TrainConfig(data=[str(d) for d in data], out=str(out), val_fractions=list(val_fraction),
                          seed=seed, arch=arch, pretrained=not no_pretrained, stages=stages,
                          batch_size=batch_size, min_sensitivity=min_sensitivity,
                          checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                          cache_dir=str(cache_dir) if cache_dir else None, device=device,
                          threads=threads, max_images_per_source=max_images,
                          freeze_early=freeze_early,
                          init_from=str(init_from) if init_from else None, rotate_deg=rotate,
                          delete_prob=delete_prob, blank_prob=blank_prob, overwrite=overwrite,
                          allow_other_split=allow_other_split)
        output_folder(cfg.resolved_checkpoint_dir(), "--checkpoint-dir")
        # default: inside the checkpoint folder; a complete cache is only read (a shared, read-only one
        # is fine), and building one where no file can be written fails at its first file, in one line
        output_folder(cfg.resolved_cache_dir(), "--cache-dir", writable=False)
        log = _log_factory(log_file)
        log(f"train: {json.dumps(cfg.__dict__)}")
        try:
            train(cfg, log=log, progress=_rich_progress_factory())
        except (FileNotFoundError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)

    @app.command("predict")
    def predict_cmd(
        images: list[Path] = typer.Argument(..., help="Fundus photographs (PNG/JPEG/TIFF/BMP/DICOM)."),
        weights: Optional[Path] = typer.Option(None, help="Checkpoint (default: shipped weights or $RETINA_FGVIS_WEIGHTS)."),
        csv: Optional[Path] = typer.Option(None, help="Also write a CSV here."),
        device: str = typer.Option("cpu", help="cpu (default: one forward pass per image needs no GPU) | cuda | auto"),
        min_side: Optional[int] = typer.Option(None, "--min-side", min=1, help="Refuse images whose shorter side is below this many pixels (default: half the classifier's input size)."),
    ) -> None:
        """p(referable DR) per image, and the decision at the shipped operating threshold.
        Exit code 1 when any image could not be scored (its error line says why).
        Research use only, not a diagnosis."""
        import pandas as pd

        from retina_fgvis.classifier.model import WeightsError, load_classifier
        from retina_fgvis.commands.checks import image_error_line, output_file, resolve_device
        from retina_fgvis.fundus.intake import ImageRejected, min_side_for, read_checked_fundus
        from retina_fgvis.fundus.io import FundusReadError
        from retina_fgvis.fundus.preprocess import NoFundusError

        device = resolve_device(device)
        if csv:
            output_file(csv, "--csv")
        try:
            clf = load_classifier(weights, device=device)
        except WeightsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        rows, failed = [], 0
        for path in images:
            try:
                rgb = read_checked_fundus(path, min_side=min_side_for(clf.input_size, min_side)).rgb
                prep = clf.prepare(rgb)
                p = float(clf.predict_proba(prep.tensor[None])[0])
                rows.append({"file": str(path), "p_referable": round(p, 4),
                             "decision": "referable" if p >= clf.threshold else "non-referable",
                             "error": ""})
                typer.echo(f"{path}\tp(referable)={p:.4f}\t{rows[-1]['decision']}")
            except (NotImplementedError, RecursionError):
                raise  # programming errors (RuntimeError subclasses): a traceback, not an error row
            except (FundusReadError, ImageRejected, NoFundusError, OSError, ValueError, RuntimeError) as exc:
                # as explain: a file the readers let through but the preparation or the model
                # cannot take (torch's errors are RuntimeErrors) fails its row, not the run
                failed += 1
                line = image_error_line(path, exc)
                rows.append({"file": str(path), "p_referable": None, "decision": "", "error": line})
                typer.echo(f"error: {line}", err=True)
        unverified = "" if clf.verified else f"; not verified: no {clf.path.name}.sha256 beside it"
        typer.echo(f"threshold {clf.threshold:.4f} (weights {clf.path.name}, sha256 {clf.sha256[:12]}{unverified}). "
                   f"{RESEARCH}")
        if csv:
            df = pd.DataFrame(rows)
            df["note"] = RESEARCH
            from retina_fgvis.report.tables import safe_csv

            atomic_write_text(csv, safe_csv(df))  # user paths and error text: formula-safe
        if failed:  # like screen and explain: a script sees that some image was not scored
            raise typer.Exit(1)

    @evaluate_app.command("classifier")
    def evaluate_classifier_cmd(
        weights: Optional[Path] = typer.Option(None, help="Checkpoint (default: shipped weights)."),
        data: list[Path] = typer.Option([], "--data", help="Override a training-data folder recorded in the metadata (matched by folder name), or add an external folder."),
        external: bool = typer.Option(False, help="Score ALL images of --data folders that are not in the metadata (external test sets)."),
        out: Optional[Path] = typer.Option(None, help="Write metrics.json, predictions.csv, metrics.md here."),
        n_boot: int = typer.Option(2000, min=1, help="Bootstrap resamples (patient level) for the AUC CI."),
        batch_size: int = typer.Option(16, min=1),
        device: str = typer.Option("cpu"),
        threads: int = typer.Option(2, min=1),
    ) -> None:
        """ROC AUC (95 % patient-bootstrap CI), sensitivity/specificity at the shipped threshold,
        per source, on the patient-wise held-out split recorded in the checkpoint.

        An image that cannot be read becomes a warning line and an error row in predictions.csv
        and the run goes on: the metrics cover the readable images and report how many were not
        (one broken file should not cost an hour-long evaluation). Research use only, not a diagnosis."""
        import numpy as np
        import pandas as pd
        import torch

        from retina_fgvis.classifier.data import build_split, load_labels, split_mismatch
        from retina_fgvis.classifier.metrics import summarise
        from retina_fgvis.classifier.model import WeightsError, load_classifier
        from retina_fgvis.commands.checks import fail, image_error_line, output_folder, resolve_device
        from retina_fgvis.fundus.io import FundusReadError, read_fundus
        from retina_fgvis.fundus.preprocess import NoFundusError

        device = resolve_device(device)
        if out:
            output_folder(out, "--out")
        torch.set_num_threads(threads)
        try:
            clf = load_classifier(weights, device=device)
        except WeightsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        meta = clf.metadata
        overrides = {Path(d).name: str(d) for d in data}
        parts = []
        recorded = meta.get("training_data", [])
        if recorded:
            folders = [overrides.pop(s["source"], s["folder"]) for s in recorded]
            fracs = [float(s["val_fraction"]) for s in recorded]
            for f in folders:
                if not (Path(f) / "labels.csv").exists():
                    typer.echo(f"error: {f}: labels.csv not found (pass --data <folder> to point at "
                               f"the data)", err=True)
                    raise typer.Exit(2)
            try:
                df = build_split(folders, fracs, int(meta.get("split_seed", 0)))
            except (FileNotFoundError, ValueError) as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2)
            if meta.get("max_images_per_source"):
                df = df[df.groupby("source", sort=False).cumcount()
                        < int(meta["max_images_per_source"])].reset_index(drop=True)
            mismatch = split_mismatch(df, meta)
            if mismatch:
                fail(mismatch)
            parts.append(df[df["val"]])
        if external or overrides:
            for name, folder in overrides.items():
                try:
                    parts.append(load_labels(folder))
                except (FileNotFoundError, ValueError) as exc:
                    typer.echo(f"error: {exc}", err=True)
                    raise typer.Exit(2)
        if not parts:
            typer.echo("error: nothing to evaluate (no training_data in metadata and no --data)", err=True)
            raise typer.Exit(2)
        ev = pd.concat(parts, ignore_index=True)
        progress = _rich_progress_factory()
        probs = np.full(len(ev), np.nan)
        errors = [""] * len(ev)
        unreadable = np.zeros(len(ev), bool)
        t0 = time.time()
        batch, where = [], []

        def flush():
            if batch:
                p = clf.predict_proba(torch.stack(batch)).numpy()
                probs[where] = p
                batch.clear()
                where.clear()

        for i, path in enumerate(progress(ev["path"].tolist(), total=len(ev), description="evaluate")):
            try:
                batch.append(clf.prepare(read_fundus(path).rgb).tensor)
                where.append(i)
            except NoFundusError as exc:  # named like an unreadable file: which of 1000 images is it?
                errors[i] = image_error_line(Path(path), exc)
                typer.echo(f"warning: {errors[i]} (skipped)", err=True)
            except FundusReadError as exc:  # "<file>: <reason>"
                errors[i] = str(exc)
                unreadable[i] = True
                typer.echo(f"warning: {exc} (skipped)", err=True)
            if len(batch) >= batch_size:
                flush()
        flush()
        secs = time.time() - t0
        ev = ev.assign(p_referable=probs, error=errors)
        ok = ev[~np.isnan(probs)]
        n_unreadable = int(unreadable.sum())
        if ok.empty:
            typer.echo(f"error: none of the {len(ev)} images could be scored "
                       f"({n_unreadable} unreadable, {len(ev) - n_unreadable} without a detectable FOV)",
                       err=True)
            raise typer.Exit(1)
        results = {"weights": str(clf.path), "sha256": clf.sha256, "threshold": clf.threshold,
                   "input_size": clf.input_size, "n_boot": n_boot, "seconds": secs,
                   "n_images": len(ev), "n_scored": len(ok), "n_unreadable": n_unreadable,
                   "n_unreadable_fov": int(np.isnan(probs).sum()) - n_unreadable,
                   "notice": RESEARCH, "sources": {}}
        for src, g in ok.groupby("source", sort=True):
            results["sources"][src] = summarise(g["rdr"].to_numpy(), g["p_referable"].to_numpy(),
                                                g["patient"].to_numpy(), clf.threshold, n_boot=n_boot)
        results["sources"]["pooled"] = summarise(ok["rdr"].to_numpy(), ok["p_referable"].to_numpy(),
                                                 ok["patient"].to_numpy(), clf.threshold, n_boot=n_boot)
        lines = [f"Held-out evaluation of {clf.path.name} (sha256 {clf.sha256[:12]}), "
                 f"threshold {clf.threshold:.4f}, input {clf.input_size} px. {RESEARCH}", "",
                 "| source | images (patients) | referable | ROC AUC [95% CI] | sensitivity [95% CI] | specificity [95% CI] |",
                 "|---|---|---|---|---|---|"]
        for src, r in results["sources"].items():
            lines.append(
                f"| {src} | {r['n']} ({r['n_patients']}) | {r['n_referable']} | {r['auc']:.3f} "
                f"[{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}] | {r['sensitivity']:.3f} "
                f"[{r['sensitivity_ci95'][0]:.3f}, {r['sensitivity_ci95'][1]:.3f}] | "
                f"{r['specificity']:.3f} [{r['specificity_ci95'][0]:.3f}, {r['specificity_ci95'][1]:.3f}] |")
        lines += ["", "Mean p(referable) by graded class (a source shortcut shows as different scales):", "",
                  "| source | non-referable | referable |", "|---|---|---|"]
        for src, r in results["sources"].items():
            shown = [f"{v:.3f}" if v is not None else "–" for v in (r["mean_p_non_referable"], r["mean_p_referable"])]
            lines.append(f"| {src} | {shown[0]} | {shown[1]} |")
        if results["n_unreadable_fov"]:
            lines.append(f"\n{results['n_unreadable_fov']} image(s) without a detectable FOV were "
                         f"skipped (listed in predictions.csv).")
        if n_unreadable:
            lines.append(f"\n{n_unreadable} image(s) could not be read and were skipped (listed "
                         f"with the reason in predictions.csv); the metrics cover the other {len(ok)}.")
        text = "\n".join(lines)
        typer.echo(text)
        typer.echo(f"({len(ev)} images in {secs:.0f} s)")
        if out:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "metrics.json", json.dumps(results, indent=1))
            atomic_write_text(out / "metrics.md", text + "\n")
            cols = ["source", "file", "patient", "rdr", "p_referable", "error"]
            from retina_fgvis.report.tables import safe_csv

            atomic_write_text(out / "predictions.csv", safe_csv(ev[cols].assign(note=RESEARCH)))
