"""`ray job submit` entry point: runs `neon-ray run` in the job's driver, which joins the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/neon_job.py quickstart --output s3://bucket/neon/run1

Arguments are those of `neon-ray run` (CONFIG, --output, --set KEY=VALUE, --force). On a multi-node
cluster the output root must be storage every node reaches (s3://, gs://, a shared mount).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the job's working dir

from neon_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
