"""``retina-fgvis screen INPUT... --out OUT``: screen a folder of fundus photographs.

Thin shell over :mod:`retina_fgvis.screening`: parses options, finds inputs, loads the
classifier, shows a progress bar, logs one line per failed image, merges the outputs, and
maps the outcome to an exit code: 0 all images screened, 1 some image failed, 2 usage error
(nothing to screen, bad manifest/weights/options, an existing run without --resume).

Multi-process: started under ``torchrun --nproc_per_node N -m retina_fgvis screen ...`` each
rank screens its own fixed batches (gloo on CPU, NCCL on GPUs) and rank 0 merges the per-image
records into the same outputs a single process writes.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import typer

NOTICE = "Research use only, not a diagnosis."
DIST_TIMEOUT_HOURS = 72
#: --embed-images above this many images is refused: the page holds every overlay in base64
#: (1.33x the JPEGs' bytes; an overlay is up to 1600 px) and a browser does not open a page of hundreds of MB
MAX_EMBEDDED_IMAGES = 200
_OUTPUT_FILES = ("results.csv", "lesions.csv", "report.html", "run.json")


class _Usage(Exception):
    pass


def _dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment (1 process otherwise)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return 0, 1, 0
    return rank, max(1, world), local


def _resolve_device(device: str, local_rank: int, world: int) -> str:
    """The shared device check (commands/checks.py), then one GPU per torchrun rank for plain ``cuda``."""
    import torch

    from retina_fgvis.commands.checks import resolve_device

    try:
        device = resolve_device(device.lower())
    except typer.BadParameter as exc:
        raise _Usage(f"--device: {exc.message}") from None
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def _previous_run(out: Path) -> bool:
    rec = out / "records"
    return (rec.is_dir() and any(rec.glob("*.json"))) or (out / "run.json").exists()


def _clear_previous(out: Path) -> None:
    """Remove only what a screening run writes (never anything else in OUT)."""
    from retina_fgvis.report.files import NAMING_KEY_FILE

    for name in ("records", "patients"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (*_OUTPUT_FILES, NAMING_KEY_FILE):  # a new run gets new folder names
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass


def screen_command(
    inputs: list[Path] = typer.Argument(..., help="Folders (searched recursively) and/or image files: PNG, JPEG, TIFF, DICOM."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Classifier checkpoint (default: $RETINA_FGVIS_WEIGHTS or weights/rdr-effnet-lite0.pt)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(4, "--batch-size", help="Images per deletion-game batch."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="CSV with columns file, patient, eye (used when a file has no DICOM header)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in OUT: finished images are skipped."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard a previous run's records and outputs in OUT and start again."),
    forget_missing: bool = typer.Option(False, "--forget-missing", help="With --resume: delete the records and overlays in OUT of files that are no longer among the inputs (e.g. a withdrawn patient)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", "--max-iterations", help="Maximum iterations of the deletion game (default: the engine's, 200; fewer for a quick look)."),
    prune: bool = typer.Option(True, "--prune/--no-prune", help="Undo the game's faint changes that its goal does not need (default: sparser, more lesion-enriched maps); --no-prune keeps the denser optimised mask (larger regions, better coverage of lesion outlines)."),
    embed_images: bool = typer.Option(False, "--embed-images", help=f"Inline the overlays in report.html (one file to share; up to {MAX_EMBEDDED_IMAGES} images)."),
    max_megapixels: float = typer.Option(50.0, "--max-megapixels", help="Reject larger images (checked before decoding)."),
    min_side: Optional[int] = typer.Option(None, "--min-side", min=1, help="Reject images whose shorter side is below this many pixels (default: half the classifier's input size, 256 px)."),
) -> None:
    """Screen fundus photographs: p(referable), FGVis deletion-game evidence, lesion regions,
    per-patient overlays, results.csv / lesions.csv / report.html. Exit code 1 when any image
    failed (its row and error line say why), 2 for a usage error. Research use only, not a diagnosis."""
    code = run_screen(
        inputs=inputs, out=out, weights=weights, device=device, batch_size=batch_size,
        manifest=manifest, resume=resume, overwrite=overwrite, iterations=iterations,
        forget_missing=forget_missing, embed_images=embed_images, max_megapixels=max_megapixels, prune=prune,
        min_side=min_side,
    )
    raise typer.Exit(code)


def run_screen(
    inputs: list[Path], out: Path, weights: Path | None = None, device: str = "auto",
    batch_size: int = 4, manifest: Path | None = None, resume: bool = False,
    overwrite: bool = False, iterations: int | None = None, embed_images: bool = False,
    max_megapixels: float = 50.0, classifier: Any = None, screener_kwargs: dict | None = None,
    prune: bool = True, min_side: int | None = None, forget_missing: bool = False,
) -> int:
    """The command body; returns the exit code. ``classifier``/``screener_kwargs`` let tests
    inject fakes (a fake explainer, overlay...) while exercising the real CLI path."""
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    rank, world, local_rank = _dist_env()
    dist = None
    try:
        if batch_size < 1:
            raise _Usage("--batch-size must be at least 1")
        if iterations is not None and iterations < 1:
            raise _Usage("--iterations must be at least 1")
        if resume and overwrite:
            raise _Usage("--resume and --overwrite exclude each other")
        if forget_missing and not resume:
            raise _Usage("--forget-missing only applies with --resume")
        if max_megapixels <= 0:
            raise _Usage("--max-megapixels must be positive")
        from retina_fgvis import screening as S

        out = Path(out).expanduser().resolve()
        if out.exists() and not out.is_dir():
            raise _Usage(f"{out}: --out exists and is not a folder")
        try:
            items, skipped = S.discover_inputs(inputs, exclude=[out])
        except S.ScreeningUsageError as exc:
            raise _Usage(str(exc)) from None
        if not items:
            where = ", ".join(str(p) for p in inputs)
            raise _Usage(f"no fundus images found in {where} (looked for PNG, JPEG, TIFF, BMP, DICOM)")
        if embed_images and len(items) > MAX_EMBEDDED_IMAGES:
            raise _Usage(
                f"--embed-images puts every overlay inside report.html, and {len(items)} of them make a page too "
                f"large for a browser; it is for up to {MAX_EMBEDDED_IMAGES} images: share the output folder "
                "(the report links its overlays) or screen a subset")
        try:
            table = S.load_manifest(manifest) if manifest is not None else None
        except S.ScreeningUsageError as exc:
            raise _Usage(str(exc)) from None
        bases = [Path(manifest).resolve().parent, Path.cwd()] if manifest is not None else []
        items, unmatched = S.assign_groups(items, table, base_dirs=bases)
        if rank == 0 and unmatched:
            err.print(f"[yellow]warning[/] {len(unmatched)} manifest rows match no input file "
                      f"(first: {escape(str(unmatched[0]))})")
        if not resume and _previous_run(out):
            if not overwrite:
                raise _Usage(f"{out} already holds a screening run: pass --resume to continue it "
                             "or --overwrite to start again")
        device = _resolve_device(device, local_rank, world)

        if world > 1:
            import torch
            import torch.distributed as tdist

            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(torch.device(device))
            if not tdist.is_initialized():
                # Ranks wait for each other only at the end of their shard, which can take
                # hours: the default 30-minute collective timeout would kill a healthy run.
                tdist.init_process_group(backend=backend, timeout=timedelta(hours=DIST_TIMEOUT_HOURS))
            dist = tdist
        if rank == 0:
            if overwrite:
                _clear_previous(out)
            out.mkdir(parents=True, exist_ok=True)
            from retina_fgvis.report.files import remove_stale_temp_files

            remove_stale_temp_files(out)
        if dist is not None:
            dist.barrier()
        from retina_fgvis.report.files import NamingKeyError, naming_key

        try:  # every rank: the first makes the key, the others read it; a damaged one stops all
            naming_key(out)
        except NamingKeyError as exc:
            raise _Usage(str(exc)) from None

        if classifier is None:
            from retina_fgvis.classifier.model import load_classifier

            try:
                classifier = load_classifier(weights, device=device)
            except ValueError as exc:  # WeightsError
                raise _Usage(str(exc)) from None
        settings = S.ScreenSettings(
            batch_size=batch_size, iterations=iterations, device=device,
            max_pixels=int(max_megapixels * 1e6), engine={} if prune else {"prune_levels": ()},
            min_side=min_side,
        )
        screener = S.Screener(classifier, out, settings, **(screener_kwargs or {}))
    except _Usage as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        _shutdown(dist)
        return 2

    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    try:
        summary = _run_with_progress(screener, items, resume, rank, world, err)
    except KeyboardInterrupt:
        # every finished image's record is on disk (written atomically, in batch order); the
        # tables and the report are not, since they would describe a partial run as a whole one
        kept = len(list((out / "records").glob("*.json")))
        err.print(f"[yellow]interrupted:[/] {kept} image records are kept in {escape(str(out / 'records'))}; run the same "
                  "command with --resume to continue (results.csv and report.html are written when it ends)")
        _shutdown(dist)
        return 130
    wall = time.perf_counter() - t0

    if dist is not None:
        dist.barrier()
    code = 0
    if rank == 0:
        records = S.collect_records(out, items)
        run_info = _run_info(S, classifier, screener, inputs, out, manifest, world, skipped,
                             summary, started, wall)
        S.merge_outputs(out, records, run_info, embed_images=embed_images)
        others = S.records_of_other_inputs(out, items)
        if others and forget_missing:
            err.print(f"forgot {S.forget_records(out, others)} earlier image record(s) of files no longer "
                      "among the inputs, with their overlays")
        elif others:
            err.print(f"[yellow]warning[/] {len(others)} earlier image record(s) in {escape(str(out / 'records'))} "
                      "belong to files no longer among the inputs: they are in no table or report of this "
                      "run but are kept, with their overlays; --resume --forget-missing deletes them")
        unnamed = S.remove_unnamed_overlays(out, records, others)  # forgotten ones read as naming none
        if unnamed:
            err.print(f"removed {unnamed} overlay(s) that no record names (replaced on this run, or left by an "
                      "earlier version or an interrupted run)")
        err.print(_summary_line(records, skipped, summary.reused if world == 1 else 0, wall)
                  + f" Report: {escape(str(out / 'report.html'))}")
        failed = sum(r.status != "ok" for r in records)
        err.print(f"[bold yellow]{NOTICE}[/]")
        code = 1 if failed else 0
    if dist is not None:
        dist.barrier()
        if rank != 0:
            records = S.collect_records(out, items)
            code = 1 if any(r.status != "ok" for r in records) else 0
    _shutdown(dist)
    return code


def _shutdown(dist: Any) -> None:
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


def _run_with_progress(screener: Any, items: list, resume: bool, rank: int, world: int, err: Any):
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from retina_fgvis.screening import plan_chunks, shard_chunks

    mine = sum(len(c) for c in shard_chunks(plan_chunks(items, screener.settings.batch_size), rank, world))
    label = "screening" if world == 1 else f"rank {rank}/{world}"
    progress = Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=False,
        disable=not err.is_terminal,
    )
    failures = 0

    def on_record(rec: Any, reused: bool) -> None:
        nonlocal failures
        if rec.status != "ok":
            failures += 1
            note = " (from the previous run)" if reused else ""
            progress.console.print(f"[red]failed[/] {escape(str(rec.file))}: {escape(str(rec.error))}{note}",
                                   markup=True, highlight=False)
        progress.update(task, advance=1, status=f"{failures} failed" if failures else "")

    def on_step(text: str) -> None:
        extra = f"{failures} failed · " if failures else ""
        progress.update(task, status=extra + text)

    with progress:
        task = progress.add_task(label, total=mine, status="")
        screener.on_step = on_step
        try:
            return screener.run(items, resume=resume, progress=on_record, rank=rank, world_size=world)
        finally:
            screener.on_step = None


def _summary_line(records: list, skipped: list, reused: int, wall: float) -> str:
    """The run's last line: what was screened, what failed, what was left out; referable counted
    in eyes and in patients (the report leads with patients, results.csv has eyes)."""
    def count(n: int, word: str) -> str:
        return f"{n} {word}" if n == 1 else f"{n} {word}s"

    n_ok = sum(r.status == "ok" for r in records)
    referable = [r for r in records if r.status == "ok" and r.referable]
    return (f"{count(len(records), 'image')} of {count(len({r.patient for r in records}), 'patient')} "
            f"in {wall:.0f} s" + (f" ({reused} finished by an earlier run)" if reused else "")
            + f": {n_ok} screened, {len(records) - n_ok} failed; {count(len(referable), 'referable eye')} in "
              f"{count(len({r.patient for r in referable}), 'patient')}"
            + (f"; {count(len(skipped), 'non-image file')} skipped" if skipped else "") + ".")


def _run_info(S: Any, classifier: Any, screener: Any, inputs: list, out: Path, manifest: Any,
              world: int, skipped: list, summary: Any, started: datetime, wall: float) -> dict:
    from dataclasses import asdict

    import retina_fgvis

    meta = dict(getattr(classifier, "metadata", {}) or {})
    engine = getattr(screener.explainer, "settings", None)
    try:
        engine_settings = asdict(engine) if engine is not None else {}
    except TypeError:
        engine_settings = {}
    settings = asdict(screener.settings)
    settings.update({
        "iterations": engine_settings.get("max_iterations", settings.get("iterations")),
        "world_size": world,
        "engine_settings": engine_settings,
        "region_settings": _region_settings(screener.settings),
        "manifest": str(manifest) if manifest else None,
    })
    return {
        "version": getattr(retina_fgvis, "__version__", "") or S.versions().get("retina-fgvis", ""),
        "command": " ".join(["retina-fgvis", *sys.argv[1:]]) if sys.argv else "",
        "inputs": [str(p) for p in inputs],
        "out": str(out),
        "model": {
            "arch": meta.get("arch", type(getattr(classifier, "model", None)).__name__),
            "path": str(getattr(classifier, "path", "") or ""),
            "sha256": getattr(classifier, "sha256", None),
            "sha256_verified": bool(getattr(classifier, "verified", False)),
            "threshold": float(getattr(classifier, "threshold", 0.5)),
            "input_size": meta.get("input_size"),
            "metadata": json.loads(json.dumps(meta, default=str)),
        },
        "settings": settings,
        "versions": S.versions(),
        "skipped_non_image_files": len(skipped),
        "timings": {
            "started_utc": started.isoformat(timespec="seconds"),
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(wall, 2),
            "images_this_run": summary.total - summary.reused,
            "images_reused_from_previous_run": summary.reused,
            "images_per_second": round((summary.total - summary.reused) / wall, 4) if wall > 0 else None,
        },
    }


def _region_settings(settings: Any) -> dict:
    try:
        from dataclasses import asdict

        from retina_fgvis.lesions import RegionSettings

        return asdict(RegionSettings(**settings.regions))
    except Exception:  # noqa: BLE001
        return dict(settings.regions)


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    app.command("screen")(screen_command)
