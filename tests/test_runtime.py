"""The CLI's allocator setting: applied at start-up (in a subprocess here, so that the test
process keeps its own allocator), honest about what it did, and switchable off."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from retina_fgvis import cli, runtime

PROBE = ("from retina_fgvis.runtime import keep_freed_memory, allocator_mode;"
         "import torch; m = keep_freed_memory(); t = torch.ones(64, 1024, 1024); del t;"
         "print(m == allocator_mode(), m)")


def _run(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**os.environ, **env},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt semantics are glibc's")
def test_keep_freed_memory_applies_on_glibc_and_large_allocations_still_work() -> None:
    out = _run({"RETINA_FGVIS_MALLOC": ""})
    assert out.startswith("True glibc") and "M_MMAP_MAX=0" in out and "M_TRIM_THRESHOLD=-1" in out


def test_keep_freed_memory_can_be_switched_off() -> None:
    assert _run({"RETINA_FGVIS_MALLOC": "system"}) == "True system default (RETINA_FGVIS_MALLOC=system)"


def test_cli_applies_it_before_running_a_command(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append("malloc") or "x")
    monkeypatch.setattr(runtime, "compile_defence_masks", lambda: calls.append("compile") or True)
    monkeypatch.setattr(cli, "app", lambda **_kw: calls.append("app"))
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0
    assert calls == ["malloc", "compile", "app"]


def test_compiled_masks_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from retina_fgvis.fgvis import defense

    monkeypatch.setattr(defense, "_compiled_mask", None)  # restored after the test
    monkeypatch.setenv("RETINA_FGVIS_COMPILE", "0")
    assert runtime.compile_defence_masks() is False and not defense.compiled_masks_enabled()
    monkeypatch.setenv("RETINA_FGVIS_COMPILE", "1")
    assert runtime.compile_defence_masks() is True and defense.compiled_masks_enabled()


TRIM_PROBE = """
import os
from retina_fgvis import runtime
def rss_mib():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
runtime.keep_freed_memory()
block = bytearray(512 * 2**20)
del block
kept = rss_mib()
small = [bytearray(1024) for _ in range(1000)]  # live data above the freed block: no plain top-trim
trimmed = runtime.trim_freed_memory()
print(trimmed, kept - rss_mib() > 400, runtime.allocator_mode())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/statm"),
                    reason="mallopt/malloc_trim semantics are glibc's; RSS read from /proc")
def test_trim_gives_a_kept_heap_back_and_keeps_the_mode() -> None:
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RETINA_FGVIS_MALLOC": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("True True glibc") and "keeps freed memory" in out.stdout


def test_faithfulness_trims_after_every_method_of_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept memory inside a method, handed back between methods: the heap is bounded by one
    method's peak (a 60-eye run that never handed memory back was killed at 24 GB)."""
    import numpy as np
    import torch
    from torch import nn

    from retina_fgvis import faithfulness as F

    calls: list[int] = []
    monkeypatch.setattr(F, "trim_freed_memory", lambda: calls.append(1) or True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    em = F.EvalModel(kind="test", model=model.eval(), mean=(0.5,) * 3, std=(0.5,) * 3, input_size=16,
                     class_names=["a", "b"], description="tiny")
    rng = np.random.default_rng(0)
    imgs = [F.EvalImage(name=f"i{i}", tensor=torch.from_numpy(rng.normal(size=(3, 16, 16)).astype(np.float32)))
            for i in range(3)]
    F.run_faithfulness(em, imgs, ["gradient", "occlusion"], batch_size=2)
    assert len(calls) == 2 * 2  # 2 batches x 2 methods
