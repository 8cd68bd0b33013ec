"""The wrapper's side of the guest API (issue #15): parsing the guest's files, and the
checkpoint-mode job options."""

from __future__ import annotations

import pytest

from boincvm.errors import XmlError
from boincvm.job import CheckpointMode, Task, VmJob, parse_job, resolve, validate_job
from boincvm.job.render import render_job
from boincvm.wrapper import guest_api
from boincvm.wrapper.guest_contract import temporary_exit_trigger


def test_status_forwards_checked_numbers() -> None:
    got = guest_api.parse_status(b"fraction_done=0.25\nfpops_cumulative=3e9\nuses_checkpoints=1\n", None)
    assert got.fraction.value == 0.25
    assert got.ops.value == 3e9
    assert got.uses_checkpoints
    assert not got.want_network
    assert guest_api.parse_status(b"want_network=1\n", None).want_network


def test_status_clamps_and_ignores_what_it_cannot_believe() -> None:
    got = guest_api.parse_status(b"fraction_done=nan\nops_cumulative=1e30\ngarbage\n", 1e12)
    assert got.fraction.value is None and got.fraction.note
    assert got.ops.value == 1e12 and got.ops.note
    assert not got.uses_checkpoints


def test_finish_status_and_message() -> None:
    got = guest_api.parse_finish(b"3\nbad input\n")
    assert (got.kind, got.exit_code, got.message) == ("completion", 3, "bad input")
    assert guest_api.parse_finish(b"99999999999\n").exit_code == 1


def test_temporary_exit_keeps_the_notice_flag() -> None:
    got = temporary_exit_trigger(b"60\n1\nno GPU memory\n")
    assert (got.delay, got.is_notice, got.message) == (60.0, True, "no GPU memory")
    assert not temporary_exit_trigger(b"60\n0\nlater\n").is_notice


def test_trickles_are_taken_oldest_first_and_checked() -> None:
    assert guest_api.trickle_names(b"00000002.msg\n00000001.msg\nx.msg.tmp\nevil\n") == [
        "00000001.msg",
        "00000002.msg",
    ]
    assert guest_api.parse_trickle(b"progress\n<step>3</step>\n") == ("progress", "<step>3</step>\n")
    assert guest_api.parse_trickle(b"<bad variety>\ntext") is None
    assert guest_api.parse_trickle(b"v\n\x1b[2Jx") == ("v", "?[2Jx")


def test_resolve_file_leaves_out_names_it_cannot_write() -> None:
    text = guest_api.resolve_text([("in", "/tmp/boincvm/in"), ("a\tb", "/x")])
    assert text == "in\t/tmp/boincvm/in\n"
    assert guest_api.sequence_of(b"7\n") == 7 and guest_api.sequence_of(b"x") is None


def test_checkpoint_mode_round_trips_and_resolves() -> None:
    job = VmJob(
        vm_image="disk.qcow2",
        task=Task(application="/bin/prog"),
        checkpoint_mode=CheckpointMode.APP,
        checkpoint_files=("state", "out"),
    )
    parsed, findings = parse_job(render_job(job))
    assert parsed == job and findings == []
    r = resolve(job)
    assert r.checkpoint_mode is CheckpointMode.APP and r.checkpoint_files == ("state", "out")
    assert resolve(VmJob(vm_image="d", task=Task(application="/p"))).checkpoint_mode is CheckpointMode.VM


@pytest.mark.parametrize(
    ("xml", "says"),
    [
        ("<checkpoint_mode>snapshot</checkpoint_mode>", "is not one of vm, app"),
        ("<checkpoint_mode>app</checkpoint_mode>", "no <checkpoint_file>"),
        (
            "<checkpoint_mode>app</checkpoint_mode><checkpoint_file>../x</checkpoint_file>",
            "leaves its directory",
        ),
        ("<checkpoint_mode>app</checkpoint_mode><checkpoint_file>/etc/x</checkpoint_file>", "is absolute"),
    ],
)
def test_bad_checkpoint_options_are_clear_errors(xml: str, says: str) -> None:
    doc = f"<vm_job><vm_image>d</vm_image><task><application>/p</application></task>{xml}</vm_job>"
    job, findings = parse_job(doc)
    messages = [str(f) for f in findings + validate_job(job, complete=True)]
    assert any(says in m for m in messages), messages
    if says != "is not one of vm, app":
        with pytest.raises(XmlError, match="checkpoint"):
            resolve(job)


def test_checkpoint_files_without_app_mode_are_a_warning() -> None:
    job = VmJob(vm_image="d", task=Task(application="/p"), checkpoint_files=("state",))
    (finding,) = validate_job(job, complete=True)
    assert "only with <checkpoint_mode>app" in str(finding)
    resolve(job)  # a warning, not an error
