"""``retina-fgvis evaluate diaretdb1``: paper Table 3 on the official DiaretDB1 layout.

Thin: parses options, builds the classifier + FGVis explainer, shows progress and prints
where the outputs went. The work is in :mod:`retina_fgvis.evaluation_diaretdb1`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retina_fgvis.commands.checks import output_folder, resolve_device
from retina_fgvis.commands.fgvis_options import check_fgvis_settings, parse_fgvis_settings


def _importance_level(value: float, what: str) -> float:
    """An importance threshold in (0, 1].

    Why this range: the importance map is the channel mean of ``1 - m`` with the mask ``m`` in
    [0, 1], and a pixel is flagged when its importance is *at or above* the level. Above 1 nothing
    can be flagged; at or below 0 every FOV pixel is, kept ones included (the area cap then picks
    among ties): both give a meaningless table without any error.
    """
    import math

    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise typer.BadParameter(f"must be in (0, 1] (importance = removed share of a pixel), got {value:g}",
                                 param_hint=what)
    return value


def _parse_floats(text: str, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise typer.BadParameter(f"{what} is empty")
    return vals


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    @evaluate_app.command("diaretdb1")
    def evaluate_diaretdb1_cmd(
        data_dir: Path = typer.Option(..., "--data-dir", help="Folder holding diaretdb1_v_1_1 (official layout)."),
        out: Path = typer.Option(..., "--out", help="Output folder (CSVs, summary.md, overlays, cache)."),
        split: str = typer.Option("test", "--split", help="Official split: train | test | all."),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images of the split."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="Classifier checkpoint "
                                               "(default: $RETINA_FGVIS_WEIGHTS or weights/rdr-effnet-lite0.pt)."),
        threshold: float = typer.Option(0.02, "--threshold", help="Absolute importance level for a flagged pixel."),
        max_fov_fraction: float = typer.Option(0.05, "--max-fov-fraction",
                                               help="Flag at most this share of FOV pixels (1 = no cap)."),
        min_area: int = typer.Option(150, "--min-area", help="Drop regions smaller than this (px at a DiaretDB1-sized FOV; scaled to the image)."),
        closing_radius: int = typer.Option(2, "--closing-radius", help="Disk closing radius (px at a DiaretDB1-sized FOV; scaled to the image)."),
        mode: str = typer.Option("coverage", "--mode", help="Default overlap mode: coverage | precision | iou."),
        aggregate: str = typer.Option("union", "--aggregate", help="GT region vs union of touching proposals "
                                      "(union) or best single proposal (pair)."),
        froc_thresholds: str = typer.Option("0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", "--froc-thresholds",
                                            help="Importance levels swept for the FROC."),
        max_iterations: Optional[int] = typer.Option(None, "--max-iterations", min=1,
                                                     help="FGVis iterations per image (default: engine's)."),
        fgvis_setting: list[str] = typer.Option([], "--fgvis-setting",
                                                help="FGVis setting override KEY=VALUE (repeatable; VALUE "
                                                     "parsed as JSON when possible), e.g. goal=fraction."),
        device: str = typer.Option("cpu", "--device", help="torch device for the classifier and the game."),
        overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Write per-image overlay PNGs."),
    ) -> None:
        """Lesion regions from FGVis deletion masks scored against DiaretDB1 (paper Table 3).

        Research use only, not a diagnosis.
        """
        from retina_fgvis.datasets.diaretdb1 import DiaretDB1, DiaretDB1Error
        from retina_fgvis.evaluation_diaretdb1 import EvalSettings, FGVisExplainer, evaluate_diaretdb1
        from retina_fgvis.lesions import RegionSettings
        from retina_fgvis.metrics.detection import AGGREGATIONS, OVERLAP_MODES

        dev = resolve_device(device)
        output_folder(out)
        if mode not in OVERLAP_MODES:
            raise typer.BadParameter(f"--mode must be one of {', '.join(OVERLAP_MODES)}")
        if aggregate not in AGGREGATIONS:
            raise typer.BadParameter(f"--aggregate must be one of {', '.join(AGGREGATIONS)}")
        _importance_level(threshold, "--threshold")
        try:
            regions = RegionSettings(threshold=threshold, max_fov_fraction=max_fov_fraction,
                                     min_area=min_area, closing_radius=closing_radius)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        froc_levels = tuple(_importance_level(t, "--froc-thresholds")
                            for t in _parse_floats(froc_thresholds, "--froc-thresholds"))
        settings = EvalSettings(regions=regions, default_mode=mode, aggregate=aggregate,
                                froc_thresholds=froc_levels, overlays=overlays)
        # the game's settings are checked before the data set and the weights are read
        fgvis_overrides = check_fgvis_settings(parse_fgvis_settings(fgvis_setting))
        if max_iterations is not None:
            fgvis_overrides["max_iterations"] = int(max_iterations)
        try:
            dataset = DiaretDB1(data_dir, split)
        except DiaretDB1Error as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)

        from retina_fgvis.classifier.model import WeightsError, load_classifier

        try:
            classifier = load_classifier(weights, device=dev)
        except WeightsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        try:
            explainer = FGVisExplainer(classifier, target=1, game="deletion", defense=True, **fgvis_overrides)
        except (TypeError, ValueError) as exc:
            typer.echo(f"error: --fgvis-setting: {str(exc).splitlines()[0] if str(exc) else exc!r}", err=True)
            raise typer.Exit(2)

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from retina_fgvis.report.files import shown_path

        n = min(limit, len(dataset)) if limit else len(dataset)
        meta = {"weights": shown_path(classifier.path) if classifier.path else "default",
                "data": str(dataset.resources)}
        with Progress(TextColumn("[bold]DiaretDB1[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), transient=False) as bar:
            task = bar.add_task(split, total=n)
            try:
                result = evaluate_diaretdb1(dataset, explainer, out, settings=settings, limit=limit,
                                            progress=lambda i, total, name: bar.update(
                                                task, completed=i, description=f"{split} {name}"),
                                            meta=meta, on_skip=lambda line: typer.echo(line, err=True))
            except DiaretDB1Error as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2)
        s = result.sensitivity
        default = s[s["mode"] == mode]
        for ov in sorted(set(default.overlap)):
            row = default[default.overlap == ov].set_index("lesion").sensitivity
            typer.echo(f"sensitivity @{100 * ov:g}% ({mode}): " +
                       "  ".join(f"{t} {100 * row.get(t, float('nan')):.1f}" for t in ("H", "HE", "SE", "RSD")))
        fp = float(result.lesion_level.fp_per_image.iloc[0]) if len(result.lesion_level) else float("nan")
        skipped = f"; {len(result.skipped)} skipped (listed in summary.md)" if result.skipped else ""
        typer.echo(f"false-positive regions / image: {fp:.2f}; {result.seconds_total:.0f} s "
                   f"({result.n_cached} cached){skipped}")
        typer.echo(f"wrote {out / 'summary.md'} — Research use only, not a diagnosis")
