"""`retina-fgvis explain IMAGE... --out DIR`: one FGVis game per image, Fig. 2 pictures + JSON.

Output names never contain the input file name (it may hold a patient name): each image gets
``image-<first 12 hex of HMAC-SHA-256(path)>`` under the output folder's naming key (as
``screen``: :mod:`retina_fgvis.report.files`), so a name cannot be traced back to a file by
trying candidate paths; the JSON says which file it came from (whoever holds it may read it).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from retina_fgvis.commands.checks import image_error_line, output_folder, resolve_device

GAME_CHOICES = ("deletion", "preservation", "generation", "repression")


def register(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    @app.command("explain")
    def explain_cmd(
        images: List[Path] = typer.Argument(..., help="Fundus photographs (PNG/JPEG/TIFF/DICOM)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (files of the same image are replaced)."),
        game: str = typer.Option("deletion", help="deletion | preservation | generation | repression"),
        defense: bool = typer.Option(True, "--defense/--no-defense", help="Eq. 6 gradient clipping."),
        weights: Optional[Path] = typer.Option(None, help="Classifier weights (default: shipped)."),
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
        iterations: Optional[int] = typer.Option(None, "--iterations", "--max-iterations", min=1, help="Iteration cap (default: the engine's, 200)."),
        prune: bool = typer.Option(True, "--prune/--no-prune", help="Undo faint changes the goal does not need (default)."),
        min_side: Optional[int] = typer.Option(None, "--min-side", min=1, help="Refuse images whose shorter side is below this many pixels (default: half the classifier's input size)."),
    ) -> None:
        """Explain p(referable) of each image with an FGVis game. Research use only, not a diagnosis."""
        import torch

        from retina_fgvis.classifier.model import REFERABLE, WeightsError, load_classifier
        from retina_fgvis.explanation_images import explanation_images
        from retina_fgvis.fgvis.presets import fundus_fgvis
        from retina_fgvis.fundus.intake import ImageRejected, min_side_for, read_checked_fundus
        from retina_fgvis.fundus.io import FundusReadError
        from retina_fgvis.fundus.preprocess import NoFundusError
        from retina_fgvis.report.files import (NamingKeyError, atomic_write_image, atomic_write_text, keyed_hex,
                                               naming_key)

        if game not in GAME_CHOICES:
            raise typer.BadParameter(f"--game must be one of {', '.join(GAME_CHOICES)}")
        dev = resolve_device(device)
        output_folder(out)
        try:  # a damaged key is a usage error: say so before the weights take seconds to load
            key = naming_key(out)
            clf = load_classifier(weights, device=dev)
        except (NamingKeyError, WeightsError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        fgvis = fundus_fgvis(clf, defense=defense, max_iterations=iterations,
                             **({} if prune else {"prune_levels": ()}))
        failures = 0
        for path in images:
            name = f"image-{keyed_hex(key, str(path))[:12]}"
            try:
                fundus = read_checked_fundus(path, min_side=min_side_for(clf.input_size, min_side))
                prepared = clf.prepare(fundus.rgb)
            except (FundusReadError, ImageRejected, NoFundusError, OSError, ValueError) as err:
                failures += 1
                typer.echo(f"error: {image_error_line(path, err)}", err=True)
                continue
            start = time.perf_counter()
            try:
                result = fgvis.attribute(
                    prepared.tensor[None].to(dev),
                    target=REFERABLE,
                    game=game,
                    fov_mask=torch.from_numpy(prepared.fov_model)[None],
                )
            except RuntimeError as err:  # out of memory and other torch failures: the next image may fit
                failures += 1
                typer.echo(f"error: {path}: the game failed ({str(err).splitlines()[0] if str(err) else type(err).__name__})",
                           err=True)
                continue
            seconds = time.perf_counter() - start
            for kind, img in explanation_images(fundus.rgb, prepared, result, 0, clf.mean).items():
                atomic_write_image(out / f"{name}_{kind}.png", img)
            summary = {
                "source": str(path),
                "research_use_only": "Research use only, not a diagnosis.",
                "weights_sha256": clf.sha256,
                "weights_sha256_verified": clf.verified,
                "p_referable_before": float(result.target_prob_before[0]),
                "p_referable_after": float(result.target_prob_after[0]),
                "referable_threshold": clf.threshold,
                "seconds": round(seconds, 2),
                "device": dev,
                **result.summary(0),
                "settings": result.settings,
                "files": {k: f"{name}_{k}.png" for k in ("mask", "explanation", "complementary_mask", "evidence", "mean_mask")},
            }
            atomic_write_text(out / f"{name}.json", json.dumps(summary, indent=2))
            typer.echo(
                f"{path} -> {out / name}.*: p(referable) {summary['p_referable_before']:.3f} -> "
                f"{summary['p_referable_after']:.3f}, {summary['iterations']} iterations, "
                f"{100 * summary['changed_fraction']:.2f} % of pixels changed by more than half, "
                f"mean mask change {100 * summary['removed_mass']:.3f} %, goal "
                f"{'reached' if summary['goal_reached'] else 'NOT reached'} ({seconds:.1f} s)"
            )
        typer.echo("Research use only, not a diagnosis.")
        raise typer.Exit(1 if failures else 0)
