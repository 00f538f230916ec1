#!/usr/bin/env python3
"""Submit a stackrec training job to a Ray cluster: thin wrapper over stackrec_dist.launch.submit.

    RAY_ADDRESS=http://<head>:8265 python launch/submit.py --config configs/smoke.yaml --wait

Same arguments as `stackrec submit`; see launch/README.md.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    repo = Path(__file__).resolve().parent.parent
    if str(repo) not in sys.path:  # works from a plain checkout too, without `pip install -e .`
        sys.path.insert(0, str(repo))
    from stackrec_dist.launch.submit import main

    sys.exit(main())
