"""A deploy as a list of steps: shown whole by a dry run, applied in order, undone on failure.

Each step says what it does in one line, whether it is needed (an app version already
installed, files already staged, workunits already submitted are not: deploy is idempotent),
how to do it and, where it can be taken back, how to undo it. When a step fails, the steps
this run applied are undone in reverse order, so a project is never left with half an app
version; what the project's tools already wrote to its database (an app registered, an app
version or workunits created) stays, and a second run finds it done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from boincvm.project.tree import BoincProject

Progress = Callable[[str], None]


class StepKind(StrEnum):
    """What a step does to the project."""

    APP = "app"
    PLAN_CLASS = "plan_class"
    APP_VERSION = "app_version"
    UPDATE_VERSIONS = "update_versions"
    TEMPLATES = "templates"
    STAGE = "stage"
    CREATE_WORK = "create_work"


@dataclass(frozen=True)
class Step:
    """One change to the project.

    Attributes:
        kind: what sort of change.
        what: one line for the administrator ("install app version hello 1.00 ...").
        needed: False when the project already has it (the step is shown, not run).
        run: makes the change (None when not needed).
        undo: takes it back when a later step fails (None: nothing to take back, or cannot).
    """

    kind: StepKind
    what: str
    needed: bool
    run: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    undo: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {"kind": self.kind.value, "what": self.what, "needed": self.needed}


@dataclass(frozen=True)
class DeployPlan:
    """Every step of one deploy, in the order they run."""

    project: BoincProject
    steps: tuple[Step, ...]

    @property
    def needed(self) -> tuple[Step, ...]:
        """The steps that change something."""
        return tuple(s for s in self.steps if s.needed)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "project": str(self.project.root),
            "owner": self.project.owner,
            "steps": [s.as_dict() for s in self.steps],
        }


def apply(plan: DeployPlan, progress: Progress | None = None) -> tuple[Step, ...]:
    """Run the needed steps in order; on failure undo the applied ones, newest first.

    Returns:
        the steps that ran.

    Raises:
        BoincvmError: the first step that failed (after the undo).
    """
    done: list[Step] = []
    try:
        for step in plan.needed:
            if progress is not None:
                progress(step.what)
            assert step.run is not None
            step.run()
            done.append(step)
    except BaseException:
        _undo(done)
        raise
    return tuple(done)


def _undo(done: Sequence[Step]) -> None:
    for step in reversed(done):
        if step.undo is not None:
            step.undo()
