"""Submitting workunits make-workunit made to a project, with the project's own tools.

Steps, each skipped when the project already has it:

1. the templates, copied into ``templates/`` under names that carry a hash of their contents
   (create_work keeps the output template's path with every workunit: a later batch must
   never change an earlier one's);
2. the files, staged into the download hierarchy where ``bin/dir_hier_path`` puts them (the
   place is computed here and checked against the project's own tool on the first file; a
   file already there with the same md5 is shared, one with other contents is refused before
   anything is copied), with create_work's ``.md5`` cache beside each;
3. ``bin/create_work --stdin``, in groups; each group that went in is recorded in the
   project's ``.boincvm/submitted`` (workunit name and a digest of its line), so a second
   deploy skips what the first submitted and an interrupted one resumes.

This works on servers of every age: it needs only ``dir_hier_path`` and ``create_work
--stdin``, not ``bin/stage_file`` (whose PHP broke on servers of April 2026 and later).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from boincvm.atomicdir import write_file_atomically
from boincvm.errors import BoincvmError, CommandFailed, InputError
from boincvm.hashing import md5_file
from boincvm.project.plan import Step, StepKind
from boincvm.project.tree import BoincProject
from boincvm.workunit.directory import WorkunitDir, project_template_name
from boincvm.workunit.make import create_work_line

#: Workunits per create_work run: one run inserts its lines in one statement (under 1 MB),
#: so a group is in the database whole or not at all.
GROUP = 200
SUBMITTED_NAME = "submitted"


@dataclass(frozen=True)
class Submission:
    """What a workunit directory asks of the project."""

    wud: WorkunitDir
    in_template: str  # name in the project's templates/
    out_template: str
    lines: tuple[tuple[str, str], ...]  # (workunit name, create_work line), not yet submitted
    submitted_before: int
    files: tuple[tuple[str, str, int], ...]  # (physical name, md5, size) to stage, each once


def read_submission(project: BoincProject, wud: WorkunitDir) -> Submission:
    """What ``wud`` needs in ``project``, less what an earlier deploy submitted.

    Raises:
        InputError: a workunit name submitted before with other inputs, or a file in the
            download hierarchy with the same name and other contents.
    """
    ledger = _read_ledger(project)
    lines: list[tuple[str, str]] = []
    files: dict[str, tuple[str, int]] = {}
    before = 0
    for record in wud.records():
        line = create_work_line(record, where=f"{wud.path}: workunit {record.name}")
        digest = _line_digest(line)
        if record.name in ledger:
            if ledger[record.name] != digest:
                raise InputError(
                    f"workunit {record.name} was submitted to this project before with other inputs",
                    hint="workunit names are unique in a project: make the batch with another --name",
                )
            before += 1
            continue
        lines.append((record.name, line))
        for f in record.files:
            files.setdefault(f.physical_name, (f.md5, f.nbytes))
    in_t = project_template_name(wud.input_template.name, wud.input_template.read_bytes())
    out_t = project_template_name(wud.output_template.name, wud.output_template.read_bytes())
    to_stage = tuple((n, md5, size) for n, (md5, size) in files.items() if not _staged(project, n, md5, size))
    return Submission(wud, in_t, out_t, tuple(lines), before, to_stage)


def _staged(project: BoincProject, name: str, md5: str, size: int) -> bool:
    """True if the download hierarchy has this file already.

    Raises:
        InputError: it has a file of that name with other contents.
    """
    dest = project.download_path(name)
    if not dest.exists():
        return False
    if dest.stat().st_size == size and md5_file(dest)[0] == md5:
        return True
    raise InputError(
        f"the project's download hierarchy has {dest} with other contents than this workunit's {name}",
        hint="BOINC files are immutable: make the workunits again (their files are named by content)",
    )


def workunit_steps(project: BoincProject, sub: Submission) -> list[Step]:
    """The steps that submit ``sub``."""
    wud = sub.wud
    templates = project.root / "templates"
    wanted = [(wud.input_template, sub.in_template), (wud.output_template, sub.out_template)]
    missing = [(src, name) for src, name in wanted if not (templates / name).exists()]
    staged: list[Path] = []
    submitted: list[int] = [0]
    nbytes = sum(size for _, _, size in sub.files)
    return [
        Step(
            StepKind.TEMPLATES,
            f"copy the templates of {wud.app_name} to templates/: {sub.in_template}, {sub.out_template}",
            bool(missing),
            run=lambda: _copy_templates(templates, missing),
        ),
        Step(
            StepKind.STAGE,
            f"stage {len(sub.files)} files ({nbytes} bytes) into the download hierarchy",
            bool(sub.files),
            run=lambda: _stage(project, wud, sub, staged),
            undo=lambda: _unstage(staged) if submitted[0] == 0 else None,
        ),
        Step(
            StepKind.CREATE_WORK,
            f"bin/create_work: {len(sub.lines)} workunits of {wud.app_name}"
            + (f" ({sub.submitted_before} submitted before)" if sub.submitted_before else ""),
            bool(sub.lines),
            run=lambda: _create_work(project, sub, submitted),
        ),
    ]


def _copy_templates(templates: Path, missing: list[tuple[Path, str]]) -> None:
    templates.mkdir(exist_ok=True)
    for src, name in missing:
        write_file_atomically(templates / name, src.read_bytes())


def _stage(project: BoincProject, wud: WorkunitDir, sub: Submission, staged: list[Path]) -> None:
    ask = True  # the project's own bin/dir_hier_path places the first file; the rule, the rest
    for name, md5, size in sub.files:
        dest = project.download_path(name)
        if ask:
            told = project.tool_download_path(name)
            ask = told != dest  # a project that places files otherwise is asked for every file
            dest = told
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f".{name}.boincvm-part")
        shutil.copyfile(wud.download / name, part)
        part.chmod(0o644)
        part.rename(dest)
        staged.append(dest)
        # create_work's cache of md5 and size ("MD5 SIZE"), newer than the file: not read again.
        write_file_atomically(dest.with_name(f"{name}.md5"), f"{md5} {size}\n".encode())


def _unstage(staged: list[Path]) -> None:
    for dest in staged:
        dest.unlink(missing_ok=True)
        dest.with_name(f"{dest.name}.md5").unlink(missing_ok=True)


def _create_work(project: BoincProject, sub: Submission, submitted: list[int]) -> None:
    argv = (
        "--appname",
        sub.wud.app_name,
        "--wu_template",
        f"templates/{sub.in_template}",
        "--result_template",
        f"templates/{sub.out_template}",
        "--stdin",
    )
    project.ledger.mkdir(exist_ok=True)
    with (project.ledger / SUBMITTED_NAME).open("a", encoding="utf-8") as ledger:
        for start in range(0, len(sub.lines), GROUP):
            group = sub.lines[start : start + GROUP]
            try:
                project.run_tool(
                    "create_work", *argv, stdin="".join(f"{line}\n" for _, line in group).encode()
                )
            except CommandFailed as exc:
                raise _why(exc, group) from None
            ledger.write("".join(f"{name}\t{_line_digest(line)}\n" for name, line in group))
            ledger.flush()
            os.fsync(ledger.fileno())
            submitted[0] += len(group)


def _why(exc: CommandFailed, group: tuple[tuple[str, str], ...]) -> BoincvmError:
    """create_work's failure in the administrator's words where it is a known one."""
    dup = re.search(r"Duplicate entry '([^']*)' for key 'name'", exc.stderr_tail)
    if dup:
        return InputError(
            f"the project already has a workunit named {dup.group(1)} (not submitted by this deploy)",
            hint="workunit names are unique in a project: make the workunits again with another --name, "
            "e.g. --name 'mybatch_{{ index }}'",
        )
    first, last = group[0][0], group[-1][0]
    return CommandFailed(
        exc.argv,
        exc.returncode,
        exc.stderr_tail,
        message=f"{exc.message} (workunits {first} to {last}; the ones before are in the project)",
        hint=exc.hint,
    )


def _line_digest(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()[:16]


def _read_ledger(project: BoincProject) -> dict[str, str]:
    path = project.ledger / SUBMITTED_NAME
    if not path.exists():
        return {}
    out = {}
    for row in path.read_text(encoding="utf-8").splitlines():
        name, _, digest = row.partition("\t")
        if name:
            out[name] = digest
    return out
