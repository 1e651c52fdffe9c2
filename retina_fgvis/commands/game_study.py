"""`retina-fgvis evaluate game-study`: the defended deletion game on DiaretDB1, settings side by side."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, List, Optional

import typer

from retina_fgvis.commands.checks import fail, output_folder, resolve_device


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
            try:
                rows_df = gs.read_csv(out / "per_image.csv")
            except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
                fail(f"{out / 'per_image.csv'}: not a game-study table ({type(exc).__name__})")
            if not {"setting", "defense", "image", "enrichment"} <= set(rows_df.columns):
                fail(f"{out / 'per_image.csv'}: not a game-study table (no setting/defense/image/enrichment "
                      "columns)")
            try:
                curve_df = gs.read_csv(out / "curves.csv")
            except (pd.errors.EmptyDataError, FileNotFoundError):  # no check was ever reached (every goal met)
                curve_df = pd.DataFrame()
            plain = sorted(set(rows_df.setting[~rows_df.defense.astype(bool)]))
            header = f"{rows_df.image.nunique()} images; run time: see study.log"
            _write_summary(out, rows_df, curve_df, plain, split, header, clf, dev)
            typer.echo(f"re-summarised -> {out / 'summary.md'}")
            return
        try:  # the layout, the split and every image are read here, before OUT is made
            images = gs.load_images(DiaretDB1(data_dir, split=split), limit=limit)
        except DiaretDB1Error as exc:
            fail(str(exc))
        out.mkdir(parents=True, exist_ok=True)
        with (out / "study.log").open("a", encoding="utf-8") as log_file:  # closed even when a game fails

            def log(msg: str) -> None:
                typer.echo(msg)
                log_file.write(msg + "\n")
                log_file.flush()

            rows, curves = [], []
            start = time.perf_counter()
            for name in names:
                for defense in ([True, False] if name in plain else [True]):
                    overrides = dict(gs.CANDIDATES[name])
                    if max_iterations is not None:
                        overrides["max_iterations"] = max_iterations
                    seed = (gs.diaretdb1_seed_cache(clf, overrides, seed_diaretdb1)
                            if seed_diaretdb1 is not None and defense else None)
                    r, c = gs.run_setting(clf, images, name, overrides, defense, batch_size=batch_size, log=log,
                                          seed_cache=seed)
                    rows += r
                    curves += c
                    per_image = pd.DataFrame(rows)
                    gs.write_csv(out / "per_image.csv", per_image)
                    gs.write_csv(out / "curves.csv", pd.DataFrame(curves))
            elapsed = time.perf_counter() - start
            _write_summary(out, pd.DataFrame(rows), pd.DataFrame(curves), plain, split,
                           f"{len(images)} images, total {elapsed / 60:.1f} min", clf, dev)
            log(f"done in {elapsed / 60:.1f} min -> {out / 'summary.md'}")


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
        table.to_markdown(index=False, floatfmt=".3g"), "",
    ]
    atomic_write_text(out / "summary.md", "\n".join(md))
