"""Tiny Ray job for the launch tests: touch the cluster, then print a STACKREC_RESULT line.

The secret is never printed, only its sha256, so the test can prove the job received it.
"""

import hashlib
import json
import os
import sys

import ray


@ray.remote(num_cpus=1)
def square(x: int) -> int:
    return x * x


def main() -> int:
    ray.init()  # inside a Ray job this connects to the job's cluster
    total = sum(ray.get([square.remote(i) for i in range(4)]))
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    result = {
        "sum_squares": total,
        "mrr@5": 0.25,
        "python": sys.executable,
        "cwd_has_job": os.path.exists("print_result.py"),
        "secret_sha256": hashlib.sha256(secret.encode()).hexdigest() if secret else None,
        "endpoint": os.environ.get("AWS_ENDPOINT_URL"),
    }
    print("STACKREC_RESULT " + json.dumps(result, sort_keys=True), flush=True)
    return int(os.environ.get("JOB_EXIT_CODE", "0"))


if __name__ == "__main__":
    sys.exit(main())
