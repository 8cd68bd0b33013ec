"""A made workunit directory, typed: its summary, its records (one JSON line per workunit)
and the files staged under ``download/``; what run-local, validate and the real-client project
read back of what :mod:`boincvm.workunit.make` wrote."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from boincvm.bounds import decode_text
from boincvm.errors import InputError, PathEscapeError
from boincvm.names import (
    logical_name_problem,
    relative_path_problem,
)

SUMMARY_NAME = "boincvm-workunits.json"
RECORDS_NAME = "workunits.jsonl"
JOBS_NAME = "jobs.txt"
FORMAT_VERSION = 1


def project_template_name(local_name: str, data: bytes) -> str:
    """The name a template gets in a project's ``templates/``: its own, plus a content hash.

    create_work keeps the output template's *path* with every workunit and the transitioner
    reads it whenever it makes a result: a later batch that wrote other contents under the
    same name would change the outputs of every earlier workunit of the app. Named by
    content, batches never overwrite each other's templates.
    """
    stem, dot, suffix = local_name.rpartition(".")
    digest = hashlib.sha256(data).hexdigest()[:12]
    return f"{stem}_{digest}.{suffix}" if dot else f"{local_name}_{digest}"


@dataclass(frozen=True)
class StagedFile:
    """A file of a workunit: logical name, physical (staged) name, md5 and size."""

    open_name: str
    physical_name: str
    md5: str
    nbytes: int


@dataclass(frozen=True)
class WorkunitRecord:
    """One workunit as recorded in ``workunits.jsonl``."""

    name: str
    files: tuple[StagedFile, ...]
    command_line: str = ""

    def to_json(self) -> str:
        """One JSON line."""
        return json.dumps(
            {
                "name": self.name,
                "command_line": self.command_line,
                "files": [[f.open_name, f.physical_name, f.md5, f.nbytes] for f in self.files],
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, line: str) -> WorkunitRecord:
        """Parse one JSON line.

        Raises:
            ValueError, KeyError, TypeError: not a record.
        """
        d = json.loads(line)
        return cls(
            name=str(d["name"]),
            files=tuple(StagedFile(str(a), str(b), str(c), int(n)) for a, b, c, n in d["files"]),
            command_line=str(d.get("command_line", "")),
        )


@dataclass(frozen=True)
class WorkunitDir:
    """A workunit directory made by ``make_workunits``, opened for reading."""

    path: Path
    app_name: str
    count: int
    input_template: Path
    output_template: Path
    open_names: tuple[str, ...]

    @property
    def download(self) -> Path:
        """Where the staged files are."""
        return self.path / "download"

    def records(self) -> Iterator[WorkunitRecord]:
        """Stream the workunit records.

        Raises:
            InputError: a line is not a record.
        """
        with (self.path / RECORDS_NAME).open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = decode_text(raw, what=f"{RECORDS_NAME}, line {lineno}")
                try:
                    record = WorkunitRecord.from_json(line)
                except (ValueError, KeyError, TypeError):
                    raise InputError(
                        f"{RECORDS_NAME}, line {lineno}: not a workunit record",
                        hint="make the workunits again with 'boincvm make-workunit'",
                    ) from None
                # The names are joined to download/ and to a slot: a '..' would leave them.
                for sf in record.files:
                    for kind, value in (("logical", sf.open_name), ("physical", sf.physical_name)):
                        if problem := logical_name_problem(value):
                            raise PathEscapeError(
                                f"{RECORDS_NAME}, line {lineno}: {kind} name {problem}",
                                hint="make the workunits again with 'boincvm make-workunit'",
                            )
                yield record

    def record(self, name: str | None = None) -> WorkunitRecord:
        """The workunit called ``name`` (or the only/first one).

        Raises:
            InputError: no such workunit.
        """
        for rec in self.records():
            if name is None or rec.name == name:
                return rec
        raise InputError(f"{self.path}: no workunit named {name!r}", hint=f"the names are in {RECORDS_NAME}")


def open_workunit_dir(path: Path) -> WorkunitDir:
    """Open a workunit directory.

    Raises:
        InputError: not a workunit directory (no summary) or an unreadable summary.
    """
    summary_path = path / SUMMARY_NAME
    if not summary_path.is_file():
        raise InputError(
            f"{path} is not a workunit directory (no {SUMMARY_NAME})",
            hint="make one with 'boincvm make-workunit'",
        )
    try:
        d = json.loads(summary_path.read_text(encoding="utf-8"))
        templates = {key: str(d[key]) for key in ("input_template", "output_template")}
        wud = WorkunitDir(
            path=path,
            app_name=str(d["app_name"]),
            count=int(d["count"]),
            input_template=path / templates["input_template"],
            output_template=path / templates["output_template"],
            open_names=tuple(str(n) for n in d["open_names"]),
        )
    except (ValueError, KeyError, TypeError):
        raise InputError(
            f"{summary_path} is not a boincvm workunit summary",
            hint="make the workunits again with 'boincvm make-workunit'",
        ) from None
    for key, value in templates.items():
        if problem := relative_path_problem(value):
            raise PathEscapeError(
                f"{summary_path}: {key} {problem}",
                hint="make the workunits again with 'boincvm make-workunit'",
            )
    return wud
