"""A batch file: one row of parameters per workunit, CSV (header line first) or JSON Lines."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from boincvm.bounds import decode_text, os_hint, require_regular_file
from boincvm.errors import InputError


def read_batch(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the rows of a CSV (header line first) or JSON Lines batch file, streaming.

    Raises:
        InputError: unreadable file, not a regular file, not UTF-8, or a malformed row (its
            line is named).
    """
    require_regular_file(path, what="batch file")
    try:
        f = path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read batch file {path}: {exc.strerror}", hint=os_hint(exc)) from None
    # Streamed line by line (a batch may be large); each line is decoded on its own so that
    # bad bytes are named by line instead of surfacing as a UnicodeDecodeError.
    lines = (decode_text(raw, what=f"batch file {path.name}, line {n}") for n, raw in enumerate(f, 1))
    with f:
        if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(
                        f"batch file {path.name}, line {lineno}: not JSON ({exc.msg})",
                        hint="write one JSON object per line",
                    ) from None
                if not isinstance(row, dict):
                    raise InputError(
                        f"batch file {path.name}, line {lineno}: a row must be a JSON object",
                        hint='write one object per line, e.g. {"x": 1}',
                    )
                yield row
        elif path.suffix.lower() in (".csv", ".tsv"):
            reader = csv.DictReader(lines, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            try:
                for row in reader:
                    if None in row:
                        raise InputError(
                            f"batch file {path.name}, line {reader.line_num}: more fields than the header",
                            hint="quote fields that contain the delimiter",
                        )
                    yield dict(row)
            except csv.Error as exc:
                raise InputError(
                    f"batch file {path.name}, line {reader.line_num}: not CSV ({exc})",
                    hint="check the quoting on that line",
                ) from None
        else:
            raise InputError(
                f"batch file {path.name}: unknown format",
                hint="use a .csv (header line first) or .jsonl file",
            )
