"""A synthetic task whose class evidence is known: bright blobs planted on a noisy background.

Class 1 ("lesion") images contain one bright disc at a random place; class 0 images do not.
A tiny CNN trained on it in a few seconds gives a model whose true evidence is exactly the blob
pixels, so an explanation can be checked against ground truth.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

SIZE = 32
RADIUS = 3.5
NOISE = 1.0
BLOB = 1.5


def make_blobs(n: int, seed: int, positive: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (n,3,S,S), labels (n,), blob masks (n,S,S) bool) in 'normalised' space."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g) * NOISE
    if positive is None:
        labels = torch.arange(n) % 2
    else:
        labels = torch.full((n,), int(positive))
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    blobs = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    for i in range(n):
        if labels[i] == 1:
            cy, cx = torch.randint(6, SIZE - 6, (2,), generator=g).tolist()
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= RADIUS**2
            blobs[i] = disc
            x[i, :, disc] += BLOB
    return x, labels, blobs


class TinyCNN(nn.Module):
    """conv-ReLU(reused module)-conv-F.relu-global max: both kinds of ReLU the defence must catch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))  # the same module object, called twice
        x = torch.nn.functional.relu(self.conv3(x))
        return self.head(x.amax(dim=(2, 3)))


@functools.lru_cache(maxsize=1)
def trained_blob_cnn() -> TinyCNN:
    """Train TinyCNN to ~100 % accuracy on the blob task (a few seconds on one CPU core)."""
    torch.manual_seed(0)
    model = TinyCNN()
    x, y, _ = make_blobs(512, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        perm = torch.randperm(len(x))
        for start in range(0, len(x), 128):
            idx = perm[start : start + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model
