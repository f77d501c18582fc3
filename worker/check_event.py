"""``moderation-worker check-event FILE|-``: run the worker's own decoder over events and say what it sees.

Producers use it to test events before sending them; operators use it to see why a record was
dead-lettered. The file holds one JSON object (possibly pretty-printed over several lines) or JSON lines
(one event per line; blank lines are skipped). For each event it prints one line:

    OK <event_id> task=<prompt|response> turns=N image=yes|no <normalized event as compact JSON>
    INVALID line N: <reason>: <message>

then a summary line. Exit status: 0 when every event is valid, 1 when any is invalid (or there are no
events), 2 when the file cannot be read.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import orjson

from worker.config import Settings
from worker.dead_letters import Rejection
from worker.decode import decode_event, event_to_dict

EXIT_ALL_VALID = 0
EXIT_SOME_INVALID = 1
EXIT_UNREADABLE = 2


def check_events(file: str, settings: Settings, *, out: TextIO | None = None) -> int:
    """Decode every event in ``file`` (a path, or ``-`` for stdin), print one line each and a summary.

    Returns the exit status: 0 all valid, 1 some invalid or none found, 2 the file cannot be read.
    """
    out = out or sys.stdout
    try:
        data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        print(f"error: cannot read {file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    valid = 0
    reasons: Counter[str] = Counter()
    for line_no, record in split_records(data):
        result = decode_event(record, settings)
        if isinstance(result, Rejection):
            reasons[result.reason.value] += 1
            print(f"INVALID line {line_no}: {result.reason.value}: {result.message}", file=out)
            continue
        valid += 1
        normalized = orjson.dumps(event_to_dict(result)).decode()
        print(
            f"OK {_printable(result.event_id)} task={result.task.value} turns={len(result.turns)} "
            f"image={'yes' if result.image is not None else 'no'} {normalized}",
            file=out,
        )
    invalid = sum(reasons.values())
    total = valid + invalid
    by_reason = ", ".join(f"{reason}={n}" for reason, n in sorted(reasons.items()))
    summary = f"checked {total} event(s): {valid} valid, {invalid} invalid"
    print(summary + (f" ({by_reason})" if by_reason else ""), file=out)
    if total == 0:
        print(f"error: no events in {file}", file=sys.stderr)
        return EXIT_SOME_INVALID
    return EXIT_ALL_VALID if invalid == 0 else EXIT_SOME_INVALID


def split_records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """``(line number, record bytes)`` for each event: the whole input if it is one JSON value, else each
    non-blank line (JSON lines). A single line is always one record, even an invalid one."""
    lines = data.split(b"\n")
    non_blank = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if len(non_blank) <= 1:
        yield from ((n, line.rstrip(b"\r")) for n, line in non_blank)
        return
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        yield from ((n, line.rstrip(b"\r")) for n, line in non_blank)
        return
    yield non_blank[0][0], data


def _printable(event_id: str) -> str:
    # Ids are untrusted: quote any with spaces or control characters so each event stays on one line.
    return (
        event_id
        if event_id.isprintable() and not any(c.isspace() for c in event_id)
        else orjson.dumps(event_id).decode()
    )
