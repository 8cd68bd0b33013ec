"""BUDA job batches (``make-workunit --buda-batch``): one workunit per job directory.

BUDA's submission layout, as ``html/user/buda_submit.php`` in BOINC reads it: a zip file
(or here also a directory) whose top level holds one directory per job and, optionally,
``shared_input_files/``. A job directory holds that job's input files and optionally a
file ``cmdline`` with its command-line arguments; ``shared_input_files/`` holds inputs
every job gets. Names starting with ``.`` are skipped; anything else at the top level
that is not a directory is an error; every job must have the same set of input files.

:func:`read_buda_batch` checks the layout and turns it into rows for the existing batch
machinery (:mod:`boincvm.workunit`): a JSON Lines file with one row per job (``job``,
``cmdline`` and one column per input) and the input specs whose paths are templates
over those columns, so the workunits share one job file and identical files are staged
once, into the same atomic output directory as ``--batch``.

A zip is unpacked into a scratch directory with every member checked first: no absolute
name, no ``..``, no symbolic link, at most :data:`MAX_MEMBERS` members and
:data:`MAX_BYTES` bytes unpacked.
"""

from __future__ import annotations

import json
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from boincvm.errors import InputError, PathEscapeError
from boincvm.names import check_logical_name
from boincvm.workunit.make import InputSpec

SHARED_DIR = "shared_input_files"
CMDLINE = "cmdline"
MAX_MEMBERS = 1_000_000
MAX_BYTES = 64 * 1024**3
#: The largest cmdline file read.
MAX_CMDLINE = 64 * 1024
_HINT = (
    "lay the batch out as BUDA does: one directory per job (its inputs, optional cmdline), "
    "optional shared_input_files/"
)


@dataclass(frozen=True)
class BudaBatch:
    """A checked BUDA batch.

    Attributes:
        rows: the JSON Lines file written, one row per job.
        inputs: input specs: shared files by path, per-job files as templates over the rows.
        jobs: the job directory names, in order.
    """

    rows: Path
    inputs: tuple[InputSpec, ...]
    jobs: tuple[str, ...]


def _unzip(archive: Path, dest: Path) -> Path:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{archive} is not a zip file ({exc})", hint=_HINT) from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise InputError(f"{archive} has more than {MAX_MEMBERS} members", hint=_HINT)
        total = 0
        for info in infos:
            name = info.filename
            parts = PurePosixPath(name).parts
            if name.startswith("/") or "\\" in name or ".." in parts or "\0" in name:
                raise PathEscapeError(f"{archive} has a member {name!r} that leaves the batch")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise PathEscapeError(f"{archive} has a symbolic link {name!r}; BUDA batches hold files")
            total += info.file_size
            if total > MAX_BYTES:
                raise InputError(f"{archive} unpacks to more than {MAX_BYTES} bytes", hint=_HINT)
        root = dest / "batch"
        root.mkdir()
        for info in infos:
            zf.extract(info, root)
    # A zip of the batch directory itself holds it as its single top-level directory.
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name != SHARED_DIR:
        inner = [p for p in entries[0].iterdir() if not p.name.startswith(".")]
        if inner and all(p.is_dir() for p in inner):
            return entries[0]
    return root


def _files(directory: Path, what: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(directory.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_symlink() or not p.is_file():
            raise InputError(f"{what}/{p.name} is not a regular file", hint=_HINT)
        check_logical_name(p.name, f"{what}/{p.name}")
        found[p.name] = p
    return found


def read_buda_batch(source: Path, scratch: Path) -> BudaBatch:
    """Check a BUDA batch (zip or directory) and write its rows into ``scratch``.

    Raises:
        InputError: not a batch in BUDA's layout (a stray file, a job missing an input, no jobs).
        PathEscapeError: a zip member is absolute, has ``..`` or is a symbolic link.
    """
    root = source if source.is_dir() else _unzip(source, scratch)
    shared: dict[str, Path] = {}
    jobs: dict[str, dict[str, Path]] = {}
    cmdlines: dict[str, str] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink() or not entry.is_dir():
            raise InputError(
                f"{entry.name} in the batch is not a directory; only job directories go there", hint=_HINT
            )
        if entry.name == SHARED_DIR:
            shared = _files(entry, SHARED_DIR)
            continue
        check_logical_name(entry.name, f"job directory {entry.name}")
        files = _files(entry, entry.name)
        if CMDLINE in files:
            data = files.pop(CMDLINE).read_bytes()[: MAX_CMDLINE + 1]
            if len(data) > MAX_CMDLINE:
                raise InputError(f"{entry.name}/cmdline is larger than {MAX_CMDLINE} bytes", hint=_HINT)
            try:
                cmdlines[entry.name] = " ".join(data.decode("utf-8").splitlines()).strip()
            except UnicodeDecodeError:
                raise InputError(f"{entry.name}/cmdline is not UTF-8 text", hint=_HINT) from None
        jobs[entry.name] = files
    if not jobs:
        raise InputError(f"{source} holds no job directories", hint=_HINT)
    names = sorted(next(iter(jobs.values())))
    for job, files in jobs.items():
        if sorted(files) != names:
            raise InputError(
                f"job {job} has the inputs {sorted(files)}, others {names}; every job needs the same files",
                hint=_HINT,
            )
        both = set(files) & set(shared)
        if both:
            raise InputError(f"job {job} and shared_input_files both have {sorted(both)[0]}", hint=_HINT)
    rows = scratch / "buda-rows.jsonl"
    with rows.open("w", encoding="utf-8") as f:
        for job, files in jobs.items():
            row = {"job": job, "cmdline": cmdlines.get(job, "")}
            row |= {f"input_{i}": str(files[n].resolve()) for i, n in enumerate(names)}
            f.write(json.dumps(row) + "\n")
    specs = [InputSpec(n, str(p.resolve())) for n, p in sorted(shared.items())]
    specs += [InputSpec(n, f"{{{{ input_{i} }}}}") for i, n in enumerate(names)]
    return BudaBatch(rows, tuple(specs), tuple(jobs))
