"""Fault drills on the tiny config (benchmarks/fault_drills.py runs the same at any size and prints the table):
kill -9 a sampling actor mid-generate, a Ray Train worker mid-finetune, a Tune trial mid-tune, and the driver
mid-finetune followed by the same command again. Every run completes, and S, θ_ft and the FID table
match an undisturbed run of the same config (the disturbed runs start from its θ_base: no drill kills the pretrain) (the session's `undisturbed_tiny_run`, which test_e2e checks too): determinism and fault tolerance checked together."""

from __future__ import annotations

import json

import pytest

from _support import TINY, fault_drills


@pytest.mark.slow
def test_every_drill_recovers_with_identical_outputs(tmp_path, undisturbed_tiny_run):
    drills = fault_drills()
    clean, outcome, sets = undisturbed_tiny_run
    rows = drills.drills(TINY, tmp_path, sets, undisturbed=(clean, outcome), from_its_base=True)
    assert [r["drill"] for r in rows][:3] == [k.name for k in drills.standard_kills()]
    for row in rows:
        assert row["killed"], f"{row['drill']}: the drill found nothing to kill"
        assert row["recovered"] and row["identical"], json.dumps({k: v for k, v in row.items() if k != "log"}, default=str)
    # The killed driver left generate finished and finetune resumable: the rerun reused the one, resumed the other.
    driver_rerun = rows[-1]["log"]
    assert "generate: up to date" in driver_rerun and "[finetune] resuming at step" in driver_rerun
    # Ray Train restarted its worker group from the last checkpoint after the killed worker.
    assert (tmp_path / "disturbed" / "finetune" / "manifest.json").exists()
