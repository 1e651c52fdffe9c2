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
    monkeypatch.setattr(cli, "app", lambda: calls.append("app"))
    cli.main()
    assert calls == ["malloc", "compile", "app"]


def test_compiled_masks_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from retina_fgvis.fgvis import defense

    monkeypatch.setattr(defense, "_compiled_mask", None)  # restored after the test
    monkeypatch.setenv("RETINA_FGVIS_COMPILE", "0")
    assert runtime.compile_defence_masks() is False and not defense.compiled_masks_enabled()
    monkeypatch.setenv("RETINA_FGVIS_COMPILE", "1")
    assert runtime.compile_defence_masks() is True and defense.compiled_masks_enabled()
