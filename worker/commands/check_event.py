"""``moderation-worker check-event FILE|-``: run the worker's own decoder over events and say what it sees.

Producers use it to test events before sending them; operators use it to see why a record was
dead-lettered. The file holds JSON lines (one event per line; blank lines are skipped), one or more JSON
objects each possibly pretty-printed over several lines, or a JSON array of events (the body
``POST /v1/moderate`` accepts). For each event it prints one line:

    OK <event_id> task=<prompt|response> turns=N image=yes|no <normalized event as compact JSON>
    INVALID line N: <reason>: <message>        (INVALID item N: ... for the items of an array)

Every event is judged by the worker's own steps, as far as they need no network: ``decode_event`` (what
the stream does with a record and HTTP with a body), then ``check_image_offline`` — a ``data:`` image is
decoded by the worker's image decoder (truncated JPEG, SVG, pixel bomb fail with the worker's reasons) and
an ``http(s)`` image URL gets the fetch's first-hop checks (a literal IP in a blocked range fails as
``image_blocked_address``). A host name is resolved and fetched only by the worker, so it is not judged here.

then a summary line. Exit status: 0 when every event is valid, 1 when any is invalid (or there are no
events), 2 when the file cannot be read.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import orjson

from worker.config import Settings
from worker.contracts.decode import decode_event, event_to_dict
from worker.contracts.events import ChatEvent
from worker.contracts.rejections import RejectedError, Rejection

EXIT_ALL_VALID = 0
EXIT_SOME_INVALID = 1
EXIT_UNREADABLE = 2
_NOT_JSON = object()


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
    for where, record in split_records(data):
        result = judge_offline(record, settings)
        if isinstance(result, Rejection):
            reasons[result.reason.value] += 1
            print(f"INVALID {where}: {result.reason.value}: {result.message}", file=out)
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


def judge_offline(record: bytes, settings: Settings) -> ChatEvent | Rejection:
    """The worker's verdict-free judgement of one record: decoding, then the offline image checks."""
    from worker.images.load import check_image_offline

    event = decode_event(record, settings)
    if isinstance(event, Rejection):
        return event
    try:
        for ref in event.images:  # several when Llama Guard 4 judges the event: each is checked
            check_image_offline(ref, settings)
    except RejectedError as exc:
        return exc.rejection
    return event


def split_records(data: bytes) -> Iterator[tuple[str, bytes]]:
    """``(where, record bytes)`` for each event, ``where`` being ``line N`` or ``item N``.

    A JSON array gives its items (re-encoded, as HTTP decodes a batch body); one or more JSON values that
    span lines (pretty-printed objects) give one record each; anything else is JSON lines, one record per
    non-blank line, so one broken line does not hide the others.
    """
    try:
        whole = orjson.loads(data)
    except orjson.JSONDecodeError:
        whole = _NOT_JSON
    if isinstance(whole, list):
        yield from ((f"item {i}", orjson.dumps(item)) for i, item in enumerate(whole))
        return
    non_blank = [(n, line.rstrip(b"\r")) for n, line in enumerate(data.split(b"\n"), start=1) if line.strip()]
    if whole is not _NOT_JSON:  # one JSON value, possibly pretty-printed
        yield f"line {non_blank[0][0]}", data
        return
    if len(non_blank) > 1:
        values = _json_values(data)
        if values is not None and any(b"\n" in raw for _, raw in values):
            yield from ((f"line {n}", raw) for n, raw in values)
            return
    yield from ((f"line {n}", line) for n, line in non_blank)


def _json_values(data: bytes) -> list[tuple[int, bytes]] | None:
    """Consecutive JSON values (``{...}\n{...}``, each possibly multi-line) with their first line, or None
    when the text is not such a sequence."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    decoder = json.JSONDecoder()
    values: list[tuple[int, bytes]] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos == len(text):
            return values
        try:
            _, end = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError):
            return None
        values.append((text.count("\n", 0, pos) + 1, text[pos:end].encode("utf-8")))
        pos = end


def _printable(event_id: str) -> str:
    # Ids are untrusted: quote any with spaces or control characters so each event stays on one line.
    return (
        event_id
        if event_id.isprintable() and not any(c.isspace() for c in event_id)
        else orjson.dumps(event_id).decode()
    )
