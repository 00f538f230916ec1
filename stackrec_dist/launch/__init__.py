"""Launching ``stackrec`` jobs on running Ray clusters (``submit.py``: ``stackrec submit``)."""
