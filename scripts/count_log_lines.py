"""Count the lines of a `neon-ray run` log by where they come from (docs/results.md, "A quickstart's log").

    python scripts/count_log_lines.py OLD.log NEW.log      # one column per log, a Markdown table

Each line is matched by a substring of the message it belongs to; a multi-line warning of Ray Data's high-memory
detector counts as many lines as it prints. What matches nothing is ours: stage lines, progress, the summary.
"""

from __future__ import annotations

import sys
from collections import Counter

OURS = "stage lines, sampling/feature lines, fine-tune progress, summary"
# (category, substrings that mark a line of it), first match wins
SOURCES = [
    ("Ray Train: \"Checkpoint successfully created\" / \"Reporting training result\"",
     ("Checkpoint successfully created", "Reporting training result")),
    ("Ray Train: worker-group start-up lines (TrainController, process group)", ("TrainController", "Setting up process group")),
    ("core-worker \"constructor arguments in the object store\"", ("core_worker.cc",)),
    ("`ray_remote_args is deprecated` (our `map_batches` call, 2 lines each)", ("ray_remote_args", "ds = ds.map_batches")),
    ("\"No CUDA runtime is found\"", ("No CUDA runtime",)),
    ("DeepSpeed \"shm_comm_op built successfully\"", ("built successfully",)),
    ("Ray Data \"Progress bars disabled\"", ("Progress bars disabled",)),
    ("Ray's token-authentication warning", ("Token authentication",)),
    ("Ray's INFO lines (\"Started a local Ray instance\", Tune's \"Wrote the latest version\") and Tune's slow-operation warnings",
     ("Started a local Ray", "tune.py", "performance bottleneck")),
]
DETECTOR = "Ray Data's high-memory detector (a multi-line warning every 30 s)"


def count(path: str) -> Counter:
    counts: Counter = Counter()
    in_warning = False
    for line in open(path, errors="replace").read().splitlines():
        if "issue_detector_manager" in line:
            in_warning = "Found 1 issues" not in line  # the warning's first line; its last names the current value
            counts[DETECTOR] += 1
            continue
        if in_warning:
            counts[DETECTOR] += 1
            in_warning = "current value" not in line
            continue
        counts[next((name for name, marks in SOURCES if any(m in line for m in marks)), OURS)] += 1
    return counts


def main(paths: list[str]) -> None:
    counts = [count(p) for p in paths]
    print("| lines of | " + " | ".join(paths) + " |")
    print("|---|" + "---|" * len(paths))
    for name in [OURS, DETECTOR, *(n for n, _ in SOURCES)]:
        if any(c[name] for c in counts):
            print(f"| {name} | " + " | ".join(str(c[name]) for c in counts) + " |")
    print("| **all** | " + " | ".join(f"**{sum(c.values())}**" for c in counts) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/count_log_lines.py LOG [LOG ...]")
    main(sys.argv[1:])
