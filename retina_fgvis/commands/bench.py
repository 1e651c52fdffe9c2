"""`retina-fgvis bench`: per-iteration cost of the games vs plain forward+backward, and throughput."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from retina_fgvis.commands.checks import image_error_line, output_file, resolve_device


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        batch: Optional[List[int]] = typer.Option(None, "--batch", min=1, help="Batch sizes (default CPU 1 4 16, GPU 1 16 64)."),
        weights: Optional[Path] = typer.Option(None, help="Classifier weights (default: shipped)."),
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
        repeats: int = typer.Option(3, min=1, help="Interleaved rounds; the median is reported."),
        autocast: bool = typer.Option(False, help="bf16 autocast (CUDA only)."),
        channels_last: bool = typer.Option(False, help="NHWC model and inputs (CUDA only)."),
        throughput_images: List[Path] = typer.Option(
            [], "--images", help="Fundus photos for the full-game throughput (default: data/samples)."),
        out: Optional[Path] = typer.Option(None, help="Also write the table as markdown here."),
    ) -> None:
        """Print ms/iteration of (a) forward+backward, (b) game, (c) defended game, and images/s.
        Research use only, not a diagnosis."""
        import torch

        from retina_fgvis.bench import bench_iterations, hardware, peak_memory_mb
        from retina_fgvis.classifier.model import WeightsError, load_classifier
        from retina_fgvis.fgvis.presets import fundus_fgvis
        from retina_fgvis.fundus.io import read_fundus
        from retina_fgvis.fundus.preprocess import stack_prepared
        from retina_fgvis.fgvis.defense import compiled_masks_enabled
        from retina_fgvis.runtime import allocator_mode
        from retina_fgvis.report.files import atomic_write_text
        from retina_fgvis.samples import DEFAULT_DIR as SAMPLES_DIR

        # checked before anything runs: a benchmark takes minutes, and its table used to be lost
        # to an --out in the way only when it was written
        dev = torch.device(resolve_device(device))
        if out is not None:
            output_file(out)
        try:
            clf = load_classifier(weights, device=str(dev))
        except WeightsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        nhwc = channels_last and dev.type == "cuda"
        if nhwc:
            clf.model.to(memory_format=torch.channels_last)
        sizes = batch or ([1, 16, 64] if dev.type == "cuda" else [1, 4, 16])
        lines = [
            f"Hardware: {hardware()}",
            f"Allocator: {allocator_mode()}; defence masks: {'compiled (torch.compile, CPU)' if compiled_masks_enabled() else 'eager'}",
            f"Classifier: {clf.metadata.get('arch')} at {clf.input_size} px, autocast={autocast and dev.type == 'cuda'}, channels_last={nhwc}",
            "",
            "| batch | (a) fwd+bwd ms/it | (b) game ms/it | (c) defended ms/it | (b)/(a) | (c)/(a) | (c) ms/it/image |",
            "|---|---|---|---|---|---|---|",
        ]
        for line in lines:
            typer.echo(line)
        for b in sizes:
            row = bench_iterations(clf.model, clf.input_size, b, dev, repeats=repeats, autocast=autocast,
                                   channels_last=nhwc)
            line = (f"| {b} | {row.plain_ms:.1f} | {row.game_ms:.1f} | {row.defended_ms:.1f} | "
                    f"{row.ratio_game:.3f} | {row.ratio_defended:.3f} | {row.defended_ms / b:.1f} |")
            typer.echo(line)
            lines.append(line)
        # full defended deletion game at the default settings on real photos (the bundled samples
        # are found beside the package, in the checkout's data/samples, not in the folder the command is run in)
        paths = list(throughput_images) or sorted(
            p for p in SAMPLES_DIR.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm"))
        prepared = []
        for p in paths:
            try:
                prepared.append(clf.prepare(read_fundus(p).rgb))
            except Exception as err:  # noqa: BLE001 - a benchmark skips unreadable inputs
                typer.echo(f"skip {image_error_line(p, err)}")
        tail = len(lines)  # what is printed after the table
        if not prepared:
            lines += ["", f"Full defended deletion game: not run, no readable image among the {len(paths)} given"
                          f"{'' if throughput_images else f' (default: {SAMPLES_DIR})'}."]
        else:
            x, fov = stack_prepared(prepared, dev)
            fgvis = fundus_fgvis(clf, autocast=autocast, channels_last=nhwc)
            start = time.perf_counter()
            result = fgvis.attribute(x, target=1, fov_mask=fov)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            lines += [
                "",
                f"Full defended deletion game, default settings, {len(prepared)} images in one batch: "
                f"{seconds:.1f} s = {len(prepared) / seconds:.3f} images/s; mean iterations "
                f"{float(result.iterations.float().mean()):.1f}; goal reached {int(result.goal_reached.sum())}/{len(prepared)}",
            ]
        lines.append(f"Peak memory: {peak_memory_mb(dev):.0f} MiB ({'CUDA allocated' if dev.type == 'cuda' else 'process max RSS'})")
        for line in lines[tail:]:
            typer.echo(line)
        if out is not None:
            atomic_write_text(out, "\n".join(lines) + "\n")
