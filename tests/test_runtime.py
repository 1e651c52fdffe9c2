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


RETURN_PROBE = """
import os
from retina_fgvis import runtime
def rss_mib():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
runtime.keep_freed_memory()
block = bytearray(512 * 2**20)
del block
kept = rss_mib()
mode = runtime.return_freed_memory()
print(kept - rss_mib() > 400, mode)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/statm"),
                    reason="mallopt/malloc_trim semantics are glibc's; RSS read from /proc")
def test_return_freed_memory_gives_a_kept_heap_back() -> None:
    out = subprocess.run([sys.executable, "-c", RETURN_PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RETINA_FGVIS_MALLOC": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True system default (freed memory returned)"


def test_faithfulness_command_returns_freed_memory(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from typer.testing import CliRunner

    calls: list[str] = []
    monkeypatch.setattr(runtime, "return_freed_memory", lambda: calls.append("returned") or "x")
    res = CliRunner().invoke(cli.app, ["evaluate", "faithfulness", "--model", "bogus", "--out", str(tmp_path)])
    assert res.exit_code != 0 and calls == ["returned"]
