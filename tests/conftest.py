"""Session-wide test set-up. Real servers live in tests/fixtures/ and are registered here."""

import os

# Keep CPU tests deterministic and light on this 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.datasets",
]
