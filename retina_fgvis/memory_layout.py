"""Which memory layout (NCHW or NHWC) a model's weights use while an evaluation runs.

Why: the faithfulness evaluation is thousands of forward passes per image (225 for each deletion
curve, 1000 for RISE, 500 for LIME). On this project's 2-core CPU, forward passes of
EfficientNet-Lite0 with channels-last (NHWC) weights were 1.26x faster than NCHW with the CLI's
kept freed memory and 1.64x with glibc's default allocator (``evaluation/bench/probes/
forward_allocator.py``); the defended game gained 1.14x (``evaluation/faithfulness/probes/
memory_layout_cpu.py``). On the H100 the FGVis game was slower with NHWC
(``evaluation/bench/gpu-h100.md``). So "auto" means NHWC on a CPU and NCHW elsewhere.

Only the layout changes, not the arithmetic's meaning: maps agree up to float rounding, and a
deletion AUC moves at most where near-tied pixels of a map swap places (≤ 5.3e-4 in the probe).
Inputs stay NCHW; a convolution with NHWC weights returns NHWC activations on its own.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

#: Names written into result rows, so a table says which layout produced each number.
CHANNELS_LAST = "channels_last"
CONTIGUOUS = "contiguous"


def resolve_channels_last(requested: bool | None, device: torch.device | str) -> bool:
    """``requested`` as given, or (None = auto) NHWC exactly when the device is a CPU."""
    if requested is not None:
        return bool(requested)
    return torch.device(device).type == "cpu"


def current_layout(model: nn.Module) -> str:
    """The layout of the first 4-D parameter whose layout shows (a 1x1 kernel is both NCHW and NHWC
    contiguous, so it is skipped); contiguous if none shows."""
    for p in model.parameters():
        if p.ndim == 4:
            nchw, nhwc = p.is_contiguous(), p.is_contiguous(memory_format=torch.channels_last)
            if nchw != nhwc:
                return CHANNELS_LAST if nhwc else CONTIGUOUS
    return CONTIGUOUS


@contextlib.contextmanager
def model_layout(model: nn.Module, channels_last: bool) -> Iterator[str]:
    """Convert the model's weights to the layout for the duration of the block, then back.

    Restored in ``finally``: a failed or interrupted evaluation leaves the caller's model as it was
    (the CLI's explain/screen paths share the loaded classifier in tests and notebooks).
    """
    before = current_layout(model)
    wanted = CHANNELS_LAST if channels_last else CONTIGUOUS
    if wanted == before:
        yield wanted
        return
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    try:
        yield wanted
    finally:
        model.to(memory_format=torch.channels_last if before == CHANNELS_LAST else torch.contiguous_format)
