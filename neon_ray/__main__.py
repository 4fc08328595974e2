"""`python -m neon_ray ...` is the `neon-ray` command."""

import sys

from .cli import main

sys.exit(main())
