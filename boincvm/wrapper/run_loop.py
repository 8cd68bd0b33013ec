"""Step 4, the main loop: heed the client, poll the program, checkpoint when due.

Each turn ticks the BOINC API and heeds abort / a lost client / quit / suspend / resume;
when a poll is due it asks the program's state and, every :data:`PROGRESS_PERIOD` (and at
each poll of a checkpoint handshake), surveys its contract files: progress to the client,
trickles, the ends the program asks for (the guest API's ``finish`` and ``temporary_exit``,
the job's trigger files), then a checkpoint when BOINC or the program says it is time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from boincvm.hypervisor.base import GuestProcess, ProcessStatus
from boincvm.job import CheckpointMode
from boincvm.wrapper import finish, memory, progress
from boincvm.wrapper.checkpoint import CheckpointRecord
from boincvm.wrapper.guest_contract import Survey, Trigger
from boincvm.wrapper.status import Phase
from boincvm.wrapper.task import Task

log = logging.getLogger(__name__)

#: On quit, take a checkpoint first when the last one is older than this.
QUIT_CHECKPOINT_AFTER = 10.0
#: Seconds the main loop sleeps between turns once the program runs (it ticks the BOINC
#: API at each turn: suspend and quit are seen within this).
LOOP_SLEEP = 0.25
#: After this many seconds of the program the state of the program is asked with each
#: survey of its files (every PROGRESS_PERIOD) instead of every poll period: fewer agent
#: calls and wake-ups for the long jobs the wrapper mostly runs.
STEADY_AFTER = 10.0
#: The program's state is asked every FIRST_POLLS seconds in its first FIRST_SPAN, then
#: every EARLY_POLLS until EARLY_SPAN: a short program's end is seen within this, and a
#: poll costs the guest no process.
FIRST_POLLS, FIRST_SPAN = 0.025, 0.3
EARLY_POLLS, EARLY_SPAN = 0.1, 2.0
#: Seconds between reads of the guest's fraction-done and credit files.
PROGRESS_PERIOD = 2.0
#: Seconds a program that wrote ``finish`` or ``temporary_exit`` may take to exit.
PROGRAM_EXIT_WAIT = 30.0
#: While the program is asked to checkpoint (it times its own checkpoints through the guest
#: API), its answer is looked for this often: it waits in boinc_checkpoint_completed()
#: until the snapshot is taken. The handshake lasts until it answers, one step of the
#: program, so the quicker polls cost little beside the checkpoints they serve.
HANDSHAKE_POLL = 0.1


def _early_poll(ran: float) -> float | None:
    """The poll interval while the program is young (``ran`` seconds); None after."""
    return FIRST_POLLS if ran < FIRST_SPAN else EARLY_POLLS if ran < EARLY_SPAN else None


@dataclass
class _Run:
    """The loop's state: the program, the last committed checkpoint, the poll pacing."""

    proc: GuestProcess
    record: CheckpointRecord | None
    t0: float  # when the loop began, in this start of the task
    paused: bool = False
    next_poll: float = 0.0
    next_progress: float = 0.0


class MainLoop:
    """Runs the program of one task to the task's exit code."""

    def __init__(self, task: Task, poll_period: float) -> None:
        self.task = task
        self.app = task.app
        self.vm = task.vm
        self.job = task.job
        self.api = task.api
        self.poll_period = poll_period

    def run(self, proc: GuestProcess, record: CheckpointRecord | None) -> int:
        """Turn until the task ends: heed the client, then poll the program when it is due."""
        task = self.task
        t0 = task.clock()
        # A fresh program has written nothing yet: the first survey of the contract files
        # is one period after its start (one that ends sooner is surveyed once, at its
        # end). A resumed one is surveyed at once: its files say where it is now.
        first = t0 if record is not None else t0 + PROGRESS_PERIOD
        run = _Run(proc, record, t0, next_progress=first)
        memory.trim()  # what copying the package and the inputs in left on the heap
        task.enter(Phase.RUN)
        while True:
            self.app.tick()
            now = task.clock()
            code = self._heed_client(run, now)
            if code is not None:
                return code
            if run.paused:
                time.sleep(0.2)
                continue
            if now >= run.next_poll:
                code = self._poll(run, now)
                if code is not None:
                    return code
            time.sleep(self._pause(run, now))

    def _pause(self, run: _Run, now: float) -> float:
        """How long to sleep before the next turn: short at first and while a poll is
        soon due (a checkpoint handshake), else one loop period."""
        if _early_poll(now - run.t0) is not None:
            return min(0.05, max(run.next_poll - self.task.clock(), 0.005))
        until_poll = max(run.next_poll - self.task.clock(), 0.02)
        return min(LOOP_SLEEP, self.poll_period, until_poll)

    def _heed_client(self, run: _Run, now: float) -> int | None:
        """Abort, a lost client, quit, suspend and resume; the exit code when the task stops."""
        app, task = self.app, self.task
        if app.abort_requested:
            log.info("aborted by the client")
            self.vm.power_off(soft_timeout=0)
            task.store.clear()
            return app.exit_abort()
        if app.client_gone:
            log.warning("the client is gone; stopping the VM")
            self.vm.power_off(soft_timeout=0)
            return app.exit_quit()
        if app.quit_requested:
            return self._quit(run, now)
        if not run.paused:
            self.api.tell_network_suspended(app.network_suspended)
        if app.suspended and not run.paused:
            self.vm.pause()
            run.paused = True
            task.enter(Phase.SUSPENDED)
        elif not app.suspended and run.paused:
            self.vm.resume()
            run.paused = False
            task.enter(Phase.RUN)
        return None

    def _quit(self, run: _Run, now: float) -> int:
        """The client asked us to quit: checkpoint first when the last one is old, then stop."""
        log.info("the client asked us to quit; we will resume later")
        if run.paused:
            self.vm.resume()
            run.paused = False
        if (
            now - self.task.last_checkpoint_at > QUIT_CHECKPOINT_AFTER
            and not self.job.disable_automatic_checkpoints
            and self.job.checkpoint_mode is CheckpointMode.VM
            and not self.api.in_critical_section()
        ):
            run.record = self.task.checkpoint(run.proc, run.record)
        self.vm.power_off(soft_timeout=2.0)
        return self.app.exit_quit()

    def _poll(self, run: _Run, now: float) -> int | None:
        """One poll of the program, with a survey of its files when due; the exit code when it ended."""
        # Poll fast at first (short programs end sooner), then once per poll period.
        # After the first seconds the program's state is due with the survey.
        ran = now - run.t0
        period = self.poll_period if ran < STEADY_AFTER else PROGRESS_PERIOD
        early = _early_poll(ran)
        run.next_poll = now + (period if early is None else early)
        status = self.vm.poll_program(run.proc)
        progress_due = now >= run.next_progress or not status.running
        checkpoint_wanted = not self.job.disable_automatic_checkpoints and (
            self.api.checkpoint_requested or self._checkpoint_due(now)
        )
        survey = None
        if progress_due or checkpoint_wanted:
            # The contract files are looked at every PROGRESS_PERIOD (and at each poll
            # of a checkpoint handshake); between surveys only the program's state.
            ended = not status.running
            survey = progress.survey(self.task, progress=progress_due, triggers=not ended, outputs=ended)
            if progress_due:
                run.next_progress = now + PROGRESS_PERIOD
                progress.report(self.task, status, survey)
                self.api.pass_trickles(survey)
            code = self._program_end(run, status, survey)
            if code is not None:
                return code
        if self._time_limit_reached(now, run.t0):
            return finish.complete(self.task, ProcessStatus(running=False, exit_code=0), run.record)
        if survey is not None and checkpoint_wanted and self.api.ready_to_checkpoint(survey, now):
            run.record = self.task.checkpoint(run.proc, run.record)
            self.api.checkpoint_taken()
        if self.api.checkpoint_requested and self.api.uses_checkpoints:
            run.next_poll = min(run.next_poll, now + HANDSHAKE_POLL)
        return None

    def _program_end(self, run: _Run, status: ProcessStatus, survey: Survey) -> int | None:
        """End the task when the program ended, or asked to (the API's files, the trigger files)."""
        task = self.task
        ended = self.api.end_trigger(survey)
        if ended is not None:
            return self._api_ended(run, ended)
        if not status.running:
            task.status.timings[Phase.RUN] = task.clock() - run.t0
            return finish.complete(task, status, run.record, survey=survey)
        trigger = progress.trigger(task, survey)
        if trigger is None:
            return None
        if trigger.kind == "completion":
            done = ProcessStatus(running=False, exit_code=trigger.exit_code)
            return finish.complete(task, done, run.record, trigger.message)
        if self.job.checkpoint_mode is CheckpointMode.VM:
            run.record = task.checkpoint(run.proc, run.record)
        self.vm.power_off(soft_timeout=2.0)
        return self.app.temporary_exit(
            trigger.delay, trigger.message or "the guest asked for a temporary exit"
        )

    def _api_ended(self, run: _Run, trigger: Trigger) -> int:
        """End the task as the program's ``boinc_finish`` or ``boinc_temporary_exit`` asked."""
        task = self.task
        # The library exits right after writing the file; C's stdio flushes the outputs at
        # exit, so the results are copied only once the program has ended.
        deadline = task.clock() + PROGRAM_EXIT_WAIT
        status = self.vm.poll_program(run.proc)
        while status.running and task.clock() < deadline:
            time.sleep(0.1)
            status = self.vm.poll_program(run.proc)
        task.status.timings[Phase.RUN] = task.clock() - run.t0
        survey = progress.survey(task, progress=True, triggers=False, outputs=True)
        progress.report(task, status, survey)  # the final fraction done and operations
        self.api.pass_trickles(survey)
        if trigger.kind == "temporary_exit":
            # No snapshot here: the program is exiting; the next start resumes from the last one.
            self.vm.power_off(soft_timeout=2.0)
            reason = trigger.message or "the guest program asked for a temporary exit"
            return self.app.temporary_exit(trigger.delay, reason, is_notice=trigger.is_notice)
        if trigger.exit_code != 0:
            return task.fail(trigger.exit_code, trigger.message or f"boinc_finish({trigger.exit_code})")
        done = ProcessStatus(
            running=False, exit_code=0, stdout_tail=status.stdout_tail, stderr_tail=status.stderr_tail
        )
        return finish.complete(task, done, run.record, trigger.message, survey=survey)

    def _time_limit_reached(self, now: float, run_t0: float) -> bool:
        limit = self.job.time_limit
        if limit is not None and now - run_t0 + self.task.elapsed_before > limit:
            log.info("time limit of %g s reached; the job counts as done", limit)
            return True
        return False

    def _checkpoint_due(self, now: float) -> bool:
        if now - self.task.last_checkpoint_at < self.job.minimum_checkpoint_interval:
            return False
        return self.app.time_to_checkpoint()


__all__ = ["LOOP_SLEEP", "PROGRESS_PERIOD", "STEADY_AFTER", "MainLoop"]
