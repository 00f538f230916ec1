"""What a ``stackrec`` command prints: metrics tables, the one-line JSON result, the one-line error.

Shared by the CLI subcommands and the quickstart; ``RESULT_PREFIX`` is also what ``stackrec submit``
looks for in a job's logs.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from stackrec_dist.errors import StackrecError

#: Prefix of the one-line JSON result a ``stackrec`` command prints last.
RESULT_PREFIX = "STACKREC_RESULT "


def print_metrics_table(title: str, rows: dict[str, dict[str, float]], ks: Sequence[int] = (5, 10, 20)) -> None:
    """rows: {row name: {"mrr@5": ..., ...}} -> a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("model")
    columns = [f"{m}@{k}" for k in ks for m in ("mrr", "hr", "ndcg")]
    for col in columns:
        table.add_column(col.upper(), justify="right")
    for name, metrics in rows.items():
        table.add_row(name, *(f"{metrics[c]:.4f}" if c in metrics else "-" for c in columns))
    # Wide enough for all columns when stdout is a pipe or a log (no terminal width to read).
    Console(width=max(160, Console().width)).print(table)


def emit_result(result: dict[str, Any]) -> None:
    """The last stdout line of a command is one JSON object, for scripts and ``ray job logs``."""
    print(RESULT_PREFIX + json.dumps(result, sort_keys=True, default=float), flush=True)


def error_log_path() -> Path:
    """Where the traceback of the last failed command goes: ``$STACKREC_ERROR_LOG`` or
    ``~/.cache/stackrec/last-error.log``."""
    return Path(os.environ.get("STACKREC_ERROR_LOG") or Path.home() / ".cache" / "stackrec" / "last-error.log")


def report_error(err: StackrecError, raised: BaseException, debug: bool = False) -> int:
    """Print ``stackrec: <kind> error: <message>`` (one line, last on stderr); return the exit code.

    The traceback of ``raised`` (with its chained causes) goes to :func:`error_log_path` and, with
    ``--debug``, to stderr above the line.
    """
    trace = "".join(traceback.format_exception(raised))
    try:
        path = error_log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"stackrec {' '.join(sys.argv[1:])}\n{trace}")
    except OSError:
        pass  # the log is a convenience; the message below is what matters
    if debug:
        print(trace, file=sys.stderr, end="")
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"stackrec: {err.kind} error: {message}", file=sys.stderr, flush=True)
    return err.exit_code
