"""Project and slot directories laid out as the BOINC client lays them out (7.20.5).

A data directory holds ``projects/<escaped master URL>/`` with the app-version and
workunit files under their physical names, and ``slots/<N>/`` where the task runs. In the
slot, every file reference becomes a ``<soft_link>`` file named by its ``open_name`` (or
physical name), or a copy for ``<copy_file/>``; ``copy_file`` outputs get no link and are
moved to the project directory after the final exit (``client/app_start.cpp``).
"""

from __future__ import annotations

import hashlib
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from boincvm.boinc.errors import ClientError
from boincvm.boinc.files import write_soft_link

DEFAULT_PROJECT_URL = "http://127.0.0.1/boincvm/"


def escape_project_url(url: str) -> str:
    """The project directory name for a master URL (``escape_project_url``).

    The scheme is dropped, every character but ASCII letters, digits, ``.``, ``-`` and
    ``_`` becomes ``_``, and one trailing ``_`` is removed:
    ``http://127.0.0.1:31480/boincvm/`` -> ``127.0.0.1_31480_boincvm``.
    """
    pos = url.find("://")
    rest = url[pos + 3 :] if pos >= 0 else url
    out = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "_" for c in rest)
    return out[:-1] if out.endswith("_") else out


def parse_command_line(text: str) -> list[str]:
    """Split a command line as the client does (``parse_command_line``).

    Whitespace separates arguments; an argument that starts with ``'`` or ``"`` runs to
    the next same quote (quotes removed). There are no escapes. The client never looks at
    the character right after an opening quote, so an empty quoted argument does not
    close: ``"" end`` is the single argument ``" end`` (seen with the 7.20.5 client).
    """
    args: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        if text[i] in "'\"":
            end = text.find(text[i], i + 2)
            end = n if end < 0 else end
            args.append(text[i + 1 : end])
            i = end + 1
        else:
            j = i
            while j < n and not text[j].isspace():
                j += 1
            args.append(text[i:j])
            i = j
    return args


@dataclass(frozen=True)
class TaskFile:
    """An app-version file or workunit input file.

    Attributes:
        source: the file on this machine, copied into the project directory.
        name: its physical name in the project directory.
        open_name: the name the app opens in the slot (the link's name); ``name`` if None.
        copy_file: copy it into the slot instead of linking.
        main_program: the program the client starts (app-version files only).
        executable: make it executable in the project directory.
    """

    source: Path
    name: str
    open_name: str | None = None
    copy_file: bool = False
    main_program: bool = False
    executable: bool = False


@dataclass(frozen=True)
class OutputFile:
    """A result (output) file.

    Attributes:
        name: its physical name in the project directory.
        open_name: the name the app writes in the slot.
        copy_file: the app writes the slot file itself; the client moves it afterwards.
        optional: a missing file is not an error.
        max_nbytes: the largest size accepted (BOINC's default is 0, so set it).
    """

    name: str
    open_name: str | None = None
    copy_file: bool = False
    optional: bool = False
    max_nbytes: int = 0


@dataclass(frozen=True)
class LocalTask:
    """One result to run: the app version, the workunit and the result's outputs."""

    app_name: str
    wu_name: str
    result_name: str
    app_files: tuple[TaskFile, ...]
    input_files: tuple[TaskFile, ...] = ()
    output_files: tuple[OutputFile, ...] = ()
    command_line: str = ""
    app_cmdline: str = ""
    version_num: int = 100
    ncpus: float = 1.0
    rsc_fpops_est: float = 1e12
    rsc_fpops_bound: float = 1e13
    rsc_memory_bound: float = 5e8
    rsc_disk_bound: float = 1e9
    delay_bound: float = 7 * 86400.0
    project_url: str = DEFAULT_PROJECT_URL

    @property
    def main_program(self) -> TaskFile:
        """The app-version file marked ``main_program`` (the last one, as in BOINC).

        Raises:
            ClientError: there is none.
        """
        mains = [f for f in self.app_files if f.main_program]
        if not mains:
            raise ClientError(f"app version of {self.app_name} has no main program")
        return mains[-1]


@dataclass(frozen=True)
class SlotLayout:
    """Where things are: ``data_dir/projects/<dir>`` and ``data_dir/slots/<slot>``."""

    data_dir: Path
    project_dir_name: str
    slot: int

    @property
    def project_dir(self) -> Path:
        """The project directory (absolute when ``data_dir`` is)."""
        return self.data_dir / "projects" / self.project_dir_name

    @property
    def slot_dir(self) -> Path:
        """The slot directory."""
        return self.data_dir / "slots" / str(self.slot)

    def from_slot(self, physical_name: str) -> str:
        """The path of a project file relative to the slot, as links name it."""
        return f"../../projects/{self.project_dir_name}/{physical_name}"


def _check_name(name: str, what: str) -> None:
    # The client refuses ".." and "%" in file names and open names.
    if not name or name.startswith("/") or ".." in name or "%" in name:
        raise ClientError(f"{what} {name!r} is not a valid BOINC file name (no '..', '%' or leading '/')")


def install_project_files(task: LocalTask, layout: SlotLayout) -> None:
    """Copy the app-version and input files into the project directory.

    Raises:
        ClientError: a name is invalid, there is no main program, or a file is missing.
    """
    task.main_program  # noqa: B018 -- raises when there is none
    layout.project_dir.mkdir(parents=True, exist_ok=True)
    for f in (*task.app_files, *task.input_files):
        _check_name(f.name, "file name")
        if f.open_name is not None:
            _check_name(f.open_name, "open name")
        dest = layout.project_dir / f.name
        try:
            if dest.is_file() and dest.stat().st_size == f.source.stat().st_size:
                continue  # BOINC files are immutable: same name, same file (as a client that has it)
            shutil.copyfile(f.source, dest)
        except FileNotFoundError:
            raise ClientError(f"{f.source} does not exist") from None
        if f.executable or f.main_program:
            dest.chmod(dest.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    for o in task.output_files:
        _check_name(o.name, "output file name")
        if o.open_name is not None:
            _check_name(o.open_name, "open name")


def _setup_file(layout: SlotLayout, name: str, open_name: str | None, *, copy: bool, is_input: bool) -> None:
    link_name = open_name or name
    link = layout.slot_dir / link_name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() or link.is_symlink():
        return  # the client leaves existing links and copies alone (restarts)
    if copy:
        if is_input:
            shutil.copyfile(layout.project_dir / name, link)
            shutil.copymode(layout.project_dir / name, link)
        return  # copied outputs: the app writes the slot file itself
    write_soft_link(link, layout.from_slot(name))


def link_slot_files(task: LocalTask, layout: SlotLayout) -> None:
    """Create the slot's links and copies for app files, inputs and outputs.

    Raises:
        OSError: a file cannot be written.
    """
    layout.slot_dir.mkdir(parents=True, exist_ok=True)
    for f in task.app_files:
        _setup_file(layout, f.name, f.open_name, copy=f.copy_file, is_input=True)
    for f in task.input_files:
        _setup_file(layout, f.name, f.open_name, copy=f.copy_file, is_input=True)
    for o in task.output_files:
        _setup_file(layout, o.name, o.open_name, copy=o.copy_file, is_input=False)


@dataclass(frozen=True)
class OutputResult:
    """An output file after the task ended.

    Attributes:
        name: physical name.
        path: where it is in the project directory.
        size: bytes, or None when missing.
        md5: hex digest, or None when missing.
        error: why it fails the result, or None.
    """

    name: str
    path: Path
    size: int | None
    md5: str | None
    error: str | None


def collect_outputs(task: LocalTask, layout: SlotLayout) -> tuple[OutputResult, ...]:
    """Move ``copy_file`` outputs into the project directory and check every output
    as the client does after the final exit (missing, too big)."""
    results: list[OutputResult] = []
    for o in task.output_files:
        dest = layout.project_dir / o.name
        if o.copy_file:
            src = layout.slot_dir / (o.open_name or o.name)
            if src.exists():
                src.replace(dest)
        if not dest.is_file():
            error = None if o.optional else f"output file {o.name} is missing"
            results.append(OutputResult(o.name, dest, None, None, error))
            continue
        size = dest.stat().st_size
        digest = hashlib.md5(usedforsecurity=False)
        with dest.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        error = None
        if size > o.max_nbytes:
            error = f"output file {o.name} is {size} bytes, more than its max_nbytes {o.max_nbytes}"
        results.append(OutputResult(o.name, dest, size, digest.hexdigest(), error))
    return tuple(results)


def clean_slot(slot_dir: Path) -> None:
    """Empty the slot directory (``client_clean_out_dir``), keeping the directory.

    Raises:
        OSError: something cannot be removed.
    """
    if not slot_dir.is_dir():
        return
    for entry in slot_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
