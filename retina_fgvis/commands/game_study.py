"""`retina-fgvis evaluate game-study`: the defended deletion game on DiaretDB1, settings side by side."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, List, Optional

import typer

from retina_fgvis.commands.checks import fail, output_folder, resolve_device
from retina_fgvis.skipped import SkippedImage


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    @evaluate_app.command("game-study")
    def game_study_cmd(
        data_dir: Path = typer.Option(..., "--data-dir", help="DiaretDB1 folder (official layout)."),
        out: Path = typer.Option(..., "--out", help="Output folder (tables, curves, plot)."),
        split: str = typer.Option("train", help="train | test | all (tune on train only)."),
        settings: Optional[List[str]] = typer.Option(None, "--setting", help="Candidate names (default: game_study.RECORDED)."),
        undefended: Optional[List[str]] = typer.Option(
            None, "--undefended", help="Settings also run without the defence (default: the first; '' = none)."),
        weights: Optional[Path] = typer.Option(None, help="Classifier weights (default: shipped)."),
        limit: Optional[int] = typer.Option(None, min=1, help="Only the first N images (quick check)."),
        max_iterations: Optional[int] = typer.Option(None, min=1, help="Override the iteration cap."),
        batch_size: int = typer.Option(4, min=1, help="Images per batched game."),
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
        seed_diaretdb1: Optional[Path] = typer.Option(
            None, help="An `evaluate diaretdb1` --out folder: the default game's maps are cached there."),
        summarise_only: bool = typer.Option(
            False, "--summarise-only", help="Run no game: rebuild summary.md/csv and the plots from OUT/per_image.csv "
            "and OUT/curves.csv (e.g. after the summary gained a column)."),
        resume: bool = typer.Option(
            False, "--resume", help="Keep the rows OUT already holds for a (setting, defence, image) and play only "
            "the missing games (after an interruption: rows are saved after every batch). Without it a "
            "re-run plays every game again and replaces its rows."),
    ) -> None:
        """Compare optimiser / step rule / λ schedule / goal settings of the deletion game.
        Research use only, not a diagnosis."""
        import pandas as pd

        from retina_fgvis import game_study as gs
        from retina_fgvis.classifier.model import WeightsError, load_classifier
        from retina_fgvis.datasets.diaretdb1 import DiaretDB1, DiaretDB1Error

        # every option is checked before the weights, the data set or a game costs anything
        dev = resolve_device(device)
        output_folder(out)
        if seed_diaretdb1 is not None:
            output_folder(seed_diaretdb1, "--seed-diaretdb1")
        names = list(settings or gs.RECORDED)
        unknown = [n for n in names if n not in gs.CANDIDATES]
        if unknown:
            raise typer.BadParameter(f"unknown setting(s) {unknown}; known: {list(gs.CANDIDATES)}")
        plain = [n for n in undefended if n] if undefended is not None else names[:1]  # "" = none
        if set(plain) - set(names):
            raise typer.BadParameter(f"--undefended {sorted(set(plain) - set(names))} not among the --setting names")
        if summarise_only and not (out / "per_image.csv").is_file():
            fail(f"{out / 'per_image.csv'} does not exist: --summarise-only rebuilds the summary of an earlier "
                  "study in --out; run the study first")
        try:
            clf = load_classifier(weights, device=dev)
        except WeightsError as exc:
            fail(str(exc))
        if summarise_only:
            _read_study_table(out / "per_image.csv")  # a one-line error when it is not a study table
            _rebuild_summary(out, split, clf, dev)
            typer.echo(f"re-summarised -> {out / 'summary.md'}")
            return
        provenance = {"split": split, "weights_sha256": clf.sha256, "max_iterations": max_iterations}
        earlier_rows, earlier_curves = _earlier_study(out, provenance)  # refused before any image is read
        skipped: dict[str, str] = {}  # image name -> "file: reason", for per_image.csv and summary.md
        skip_lines: list[str] = []

        def on_skip(skip: SkippedImage) -> None:
            skip_lines.append(skip.line())
            typer.echo(skip_lines[-1], err=True)
            skipped[skip.image] = skip.cell()

        try:  # the layout, the split and every image are read here, before OUT is made
            dataset = DiaretDB1(data_dir, split=split)
            images = gs.load_images(dataset, limit=limit, on_skip=on_skip)
        except DiaretDB1Error as exc:
            fail(str(exc))
        if not images:
            fail(f"{dataset.image_dir}: no usable images: all {len(skipped)} image(s) of split {split!r} "
                 "were skipped (each reported above)")
        out.mkdir(parents=True, exist_ok=True)
        with (out / "study.log").open("a", encoding="utf-8") as log_file:  # closed even when a game fails

            def log(msg: str) -> None:
                typer.echo(msg)
                log_file.write(msg + "\n")
                log_file.flush()

            log_file.write("".join(line + "\n" for line in skip_lines))
            if not earlier_rows.empty:
                log(f"keeping {len(earlier_rows)} row(s) of an earlier study in {out} "
                    + ("(their games are not played again)" if resume else "(a re-run row replaces its own)"))
            done = gs.finished_keys(earlier_rows) if resume else set()
            rows, curves = [], []

            def save(batch_rows: list[dict], batch_curves: list[dict]) -> None:
                """Merge and write after every batch (and rebuild the summary from what is on disk)."""
                rows.extend({**row, **provenance} for row in batch_rows)
                curves.extend(batch_curves)
                _save_merged(out, earlier_rows, earlier_curves, pd.DataFrame(rows), pd.DataFrame(curves))
                _rebuild_summary(out, split, clf, dev)

            start = time.perf_counter()
            for name in names:
                for defense in ([True, False] if name in plain else [True]):
                    overrides = dict(gs.CANDIDATES[name])
                    if max_iterations is not None:
                        overrides["max_iterations"] = max_iterations
                    seed = (gs.diaretdb1_seed_cache(clf, overrides, seed_diaretdb1)
                            if seed_diaretdb1 is not None and defense else None)
                    todo = [im for im in images if gs.game_key(name, defense, im.name) not in done]
                    if len(todo) < len(images):
                        log(f"{name} defense={defense}: {len(images) - len(todo)} image(s) kept from earlier rows (--resume)")
                    gs.run_setting(clf, todo, name, overrides, defense, batch_size=batch_size, log=log,
                                   seed_cache=seed, on_batch=save)
                    if skipped:
                        save(gs.skipped_rows(name, defense, skipped), [])
            elapsed = time.perf_counter() - start
            _rebuild_summary(out, split, clf, dev, run_time=f"this run {elapsed / 60:.1f} min"
                             + ("" if earlier_rows.empty else ", earlier runs' rows kept (their times: study.log)"))
            log(f"done in {elapsed / 60:.1f} min -> {out / 'summary.md'}")


def _read_study_table(path: Path) -> Any:
    """A study's per_image.csv, or a one-line error when it is not one."""
    import pandas as pd

    from retina_fgvis import game_study as gs

    try:
        rows = gs.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        fail(f"{path}: not a game-study table ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if not {"setting", "defense", "image", "enrichment"} <= set(rows.columns):
        fail(f"{path}: not a game-study table (no setting/defense/image/enrichment columns)")
    return rows


def _earlier_study(out: Path, provenance: dict[str, Any]) -> tuple[Any, Any]:
    """(per-image rows, curve rows) a study left in OUT, to be merged with this run's; empty when
    there is none. Rows made with another classifier, split or iteration cap (or by a version that
    did not record these) are refused in one line: merging would mix them in one summary line."""
    import pandas as pd

    from retina_fgvis import game_study as gs

    if not (out / "per_image.csv").is_file():
        return pd.DataFrame(), pd.DataFrame()
    rows = _read_study_table(out / "per_image.csv")
    conflict = gs.provenance_conflict(rows, provenance)
    if conflict:
        fail(f"{out / 'per_image.csv'}: {conflict}")
    return rows, _read_curves(out / "curves.csv")


def _read_curves(path: Path) -> Any:
    """A study's curves.csv (empty when no check was ever reached: every goal met at once), or a
    one-line error when it is damaged."""
    import pandas as pd

    from retina_fgvis import game_study as gs

    try:
        return gs.read_csv(path)
    except (pd.errors.EmptyDataError, FileNotFoundError):
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        fail(f"{path}: not a game-study curves table ({type(exc).__name__}); move it away or use a new --out")


def _save_merged(out: Path, earlier_rows: Any, earlier_curves: Any, rows: Any, curves: Any) -> None:
    """Write the earlier study's rows merged with this run's (each file atomically); the curves
    first, so that per_image.csv, which the summary is rebuilt from, is never ahead of them."""
    from retina_fgvis import game_study as gs

    gs.write_csv(out / "curves.csv", gs.merge_rows(earlier_curves, curves, replaces=rows))
    gs.write_csv(out / "per_image.csv", gs.merge_rows(earlier_rows, rows))


def _rebuild_summary(out: Path, split: str, clf: object, dev: str, run_time: str = "see study.log") -> None:
    """summary.csv/md and the plots from OUT/per_image.csv and OUT/curves.csv as they are on disk,
    so that the summary always agrees with the merged table (after each batch, and for
    --summarise-only). The split shown is the rows' own where they record it; ``run_time`` is
    this run's, once it is known (earlier runs' times are in study.log)."""
    from retina_fgvis import game_study as gs

    rows = gs.read_csv(out / "per_image.csv")
    curves = _read_curves(out / "curves.csv")
    scored = rows[~gs.is_skipped(rows)]
    plain = sorted(set(scored.setting[~scored.defense.astype(bool)]))
    splits = sorted(set(rows["split"].dropna().astype(str))) if "split" in rows.columns else []
    _write_summary(out, rows, curves, plain, ", ".join(splits) or split,
                   f"{scored.image.nunique()} images; run time: {run_time}", clf, dev)


def _write_summary(out: Path, rows: Any, curves: Any, plain: list[str], split: str,
                   header: str, clf: object, dev: str) -> None:
    """summary.csv, summary.md and one enrichment-vs-iterations plot per setting run both ways."""
    from retina_fgvis import game_study as gs
    from retina_fgvis.report.files import atomic_write_text, shown_path

    table = gs.aggregate(rows)
    gs.write_csv(out / "summary.csv", table)
    for name in plain:
        gs.plot_curves(curves, name, out / f"enrichment_vs_iterations_{name}.png")
    md = [
        f"# Deletion-game study on DiaretDB1 ({split} split)", "",
        "Research use only, not a diagnosis.", "",
        f"Classifier: `{shown_path(clf.path) if clf.path else 'default'}` (sha256 {str(clf.sha256)[:12]}…), "
        f"threshold {clf.threshold:.3f}, "
        f"device {dev}; {header}.", "",
        "Enrichment = share of removed mass inside GT lesions (any type, >= 0.75) / GT share of the FOV "
        "(1 = chance; images without GT lesions have none and are left out of its medians). Goal = p(referable) "
        "<= max(the classifier's threshold, p of the fully deleted image); 'referable' = images the classifier "
        "calls referable. `enrichment_goal_reached` / `_missed`: medians over the images whose goal was / was not "
        "reached.", "",
        table.to_markdown(index=False, floatfmt=".3g"), "", *_skipped_lines(rows),
    ]
    atomic_write_text(out / "summary.md", "\n".join(md))


def _skipped_lines(rows: Any) -> list[str]:
    """summary.md lines naming each image skipped as unreadable and why (none when nothing was):
    the table above leaves these images out."""
    from retina_fgvis import game_study as gs

    gone = rows[gs.is_skipped(rows)]
    if gone.empty:
        return []
    lines = ["## Skipped images", "", ("Could not be read and are left out of the settings named "
                                       "(per_image.csv, column `skipped`):"), ""]
    for (image, why), g in gone.groupby(["image", "skipped"], sort=False):
        lines.append(f"- {image}: {why} ({', '.join(dict.fromkeys(g.setting.astype(str)))})")
    return lines + [""]
