"""Speed of the games against their physical floor, measured side by side in one process.

The deletion game costs ``iterations × (forward + backward)`` of the classifier. The benchmark
times, per iteration and per batch size:

(a) plain forward + backward w.r.t. the input (parameters frozen, as in the game);
(b) one deletion-game iteration without the defence;
(c) one deletion-game iteration with the defence;

and reports (b)/(a), (c)/(a). Per-iteration game cost is isolated from the one-off costs
(clean pass, final pass) by timing two runs of N1 and N2 fixed iterations and dividing the
difference by N2 - N1. The three variants are interleaved (a, b, c, a, b, c, ...) over
``repeats`` rounds and the median is kept, so that background load hits them alike.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from retina_fgvis.fgvis.games import FGVis


def hardware() -> str:
    """The machine in words (CPU model and threads, or GPU name)."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@dataclass
class BenchRow:
    batch: int
    plain_ms: float
    game_ms: float
    defended_ms: float

    @property
    def ratio_game(self) -> float:
        return self.game_ms / self.plain_ms

    @property
    def ratio_defended(self) -> float:
        return self.defended_ms / self.plain_ms


def bench_iterations(
    model: torch.nn.Module,
    size: int,
    batch: int,
    device: torch.device,
    repeats: int = 3,
    n1: int = 2,
    n2: int = 6,
    autocast: bool = False,
    channels_last: bool = False,
    defense_fuse: bool = True,
) -> BenchRow:
    """Milliseconds per iteration for (a), (b), (c) at one batch size.

    ``channels_last`` (CUDA): the caller converts the model; (a) then feeds NHWC inputs and the
    games convert their explanation to NHWC before the forward pass, as in production.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    nhwc = channels_last and device.type == "cuda"
    target = torch.ones(batch, dtype=torch.long, device=device)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()

    def plain(n: int) -> None:
        for _ in range(n):
            e = x.clone().requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
                out = model(e.contiguous(memory_format=torch.channels_last) if nhwc else e)
            torch.softmax(out.float(), 1)[:, 1].sum().backward()

    # goal_level=0: p never reaches 0, so every run does exactly max_iterations steps
    def game(defense: bool, n: int) -> None:
        FGVis(model, defense=defense, max_iterations=n, check_every=n, goal_level=0.0, autocast=autocast,
              channels_last=nhwc, defense_fuse=defense_fuse).attribute(
            x, target=target
        )

    try:
        plain(1), game(False, 1), game(True, 1)  # warm-up (allocator, cudnn autotune)
        times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
        for _ in range(repeats):
            times["a"].append((_timed(lambda: plain(n2), device) - _timed(lambda: plain(n1), device)) / (n2 - n1))
            times["b"].append((_timed(lambda: game(False, n2), device) - _timed(lambda: game(False, n1), device)) / (n2 - n1))
            times["c"].append((_timed(lambda: game(True, n2), device) - _timed(lambda: game(True, n1), device)) / (n2 - n1))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return BenchRow(batch, med["a"], med["b"], med["c"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
