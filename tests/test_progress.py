"""Progress lines: every update in a terminal, a few per interval in a log."""

from __future__ import annotations

import time

from neon_ray.runtime.progress import Progress


def test_progress_is_throttled_in_a_log_and_complete_in_a_terminal(monkeypatch, capsys):
    monkeypatch.setenv("NEON_RAY_INTERACTIVE", "0")
    monkeypatch.setenv("NEON_RAY_PROGRESS_SECONDS", "0.25")
    shown = Progress()
    t0 = time.monotonic()
    for i in range(100):
        shown.update(f"step {i}", final=i == 99)
        time.sleep(0.01)
    seconds = time.monotonic() - t0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 0" and lines[-1] == "step 99"  # the first and the last line always
    assert len(lines) <= seconds / 0.25 + 2, (len(lines), seconds)

    monkeypatch.setenv("NEON_RAY_INTERACTIVE", "1")
    shown = Progress()
    for i in range(20):
        shown.update(f"step {i}")
    assert len(capsys.readouterr().out.splitlines()) == 20
