"""boincvm's guest-side BOINC API for Python programs (standard library only, Python 3.6+).

The functions keep the names of BOINC's C API; they talk to the boincvm wrapper on the
host through files in the directory named by ``BOINCVM_API_DIR`` (see boinc_api.c for the
list). Without that variable the program runs standalone.
"""

import os
import sys
import time

STATUS_INTERVAL = 0.5
REQUEST_INTERVAL = 0.1
SNAPSHOT_WAIT = 3600.0

_state = {
    "initialized": False,
    "dir": None,
    "start": 0.0,
    "values": {},
    "dirty": False,
    "last_write": -1e30,
    "uses_checkpoints": False,
    "want_network": False,
    "critical": 0,
    "last_check": -1e30,
    "request": False,
    "trickle_seq": 0,
}
_ORDER = ("fraction_done", "ops_cumulative", "fpops_cumulative", "ops_per_cpu_sec", "fpops_per_cpu_sec")


def _setup():
    if _state["initialized"]:
        return
    _state["initialized"] = True
    _state["start"] = time.monotonic()
    d = os.environ.get("BOINCVM_API_DIR", "")
    if d and os.path.isdir(d):
        _state["dir"] = d


def _path(name):
    return os.path.join(_state["dir"], name)


def _write(name, text):
    path = _path(name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def _write_status(force=False):
    if _state["dir"] is None or not (_state["dirty"] or force):
        return
    t = time.monotonic()
    if not force and t - _state["last_write"] < STATUS_INTERVAL:
        return
    values = _state["values"]
    lines = ["%s=%.17g\n" % (k, values[k]) for k in _ORDER if k in values]
    if _state["uses_checkpoints"]:
        lines.append("uses_checkpoints=1\n")
    if _state["want_network"]:
        lines.append("want_network=1\n")
    try:
        _write("status", "".join(lines))
    except OSError:
        return
    _state["dirty"] = False
    _state["last_write"] = t


def _set(key, value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return
    if not value >= 0.0 or value > 1e300:
        return
    if _state["values"].get(key) != value:
        _state["dirty"] = True
    _state["values"][key] = value


def boinc_init():
    _setup()
    return 0


boinc_init_options = boinc_init


def boinc_is_standalone():
    _setup()
    return 1 if _state["dir"] is None else 0


def boinc_elapsed_time():
    _setup()
    return time.monotonic() - _state["start"]


def boinc_set_min_checkpoint_period(seconds):
    return 0


def boinc_resolve_filename(name):
    """The guest path of logical file NAME (the name itself when the wrapper maps none)."""
    _setup()
    if _state["dir"] is not None:
        try:
            with open(_path("resolve"), encoding="utf-8", errors="replace") as f:
                for line in f:
                    logical, sep, physical = line.rstrip("\n").partition("\t")
                    if sep and logical == name:
                        return physical
        except OSError:
            pass
    return name


boinc_resolve_filename_s = boinc_resolve_filename


def boinc_fraction_done(x):
    _setup()
    try:
        x = float(x)
    except (TypeError, ValueError):
        return 0
    x = min(1.0, x) if x >= 0.0 else 0.0
    _set("fraction_done", x)
    _write_status()
    return 0


def boinc_get_fraction_done():
    return _state["values"].get("fraction_done", 0.0)


def boinc_ops_cumulative(fp, integer):
    _setup()
    _set("fpops_cumulative", fp)
    _set("ops_cumulative", integer)
    _write_status()


def boinc_ops_per_cpu_sec(fp, integer):
    _setup()
    _set("fpops_per_cpu_sec", fp)
    _set("ops_per_cpu_sec", integer)
    _write_status()


def boinc_fpops_cumulative(fp):
    _setup()
    _set("fpops_cumulative", fp)
    _write_status()


def boinc_fpops_per_cpu_sec(fp):
    _setup()
    _set("fpops_per_cpu_sec", fp)
    _write_status()


def boinc_begin_critical_section():
    _setup()
    _state["critical"] += 1
    if _state["critical"] == 1 and _state["dir"] is not None:
        _write("critical", "1\n")


def boinc_end_critical_section():
    _setup()
    if _state["critical"] == 0:
        return
    _state["critical"] -= 1
    if _state["critical"] == 0 and _state["dir"] is not None:
        try:
            os.unlink(_path("critical"))
        except OSError:
            pass


def boinc_time_to_checkpoint():
    _setup()
    if _state["dir"] is None:
        return 0
    if not _state["uses_checkpoints"]:
        _state["uses_checkpoints"] = True
        _write_status(force=True)
    if _state["critical"] > 0:
        return 0
    t = time.monotonic()
    if t - _state["last_check"] >= REQUEST_INTERVAL:
        _state["request"] = os.path.exists(_path("checkpoint_request"))
        _state["last_check"] = t
    if not _state["request"]:
        return 0
    boinc_begin_critical_section()
    return 1


def boinc_checkpoint_completed():
    _setup()
    if _state["dir"] is None:
        return 0
    if _state["critical"] > 0:
        boinc_end_critical_section()
    _write_status(force=True)
    _state["request"] = False
    _state["last_check"] = -1e30
    if _state["critical"] > 0:
        return 0
    try:
        with open(_path("checkpoint_request")) as f:
            seq = f.read(64)
    except OSError:
        return 0
    _write("checkpoint_ready", seq)
    deadline = time.monotonic() + SNAPSHOT_WAIT
    while os.path.exists(_path("checkpoint_request")) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        os.unlink(_path("checkpoint_ready"))
    except OSError:
        pass
    return 0


def _message(name, first, second, text):
    if _state["dir"] is None:
        return
    body = "%d\n" % first
    if second is not None:
        body += second + "\n"
    if text:
        body += text if text.endswith("\n") else text + "\n"
    _write(name, body)


def boinc_finish_message(status, message=None, is_notice=False):
    _setup()
    sys.stdout.flush()
    sys.stderr.flush()
    _write_status(force=True)
    _message("finish", int(status), None, message)
    os._exit(int(status))


def boinc_finish(status):
    boinc_finish_message(status)


def boinc_temporary_exit(delay, reason=None, is_notice=False):
    _setup()
    sys.stdout.flush()
    sys.stderr.flush()
    _write_status(force=True)
    _message("temporary_exit", int(delay), "1" if is_notice else "0", reason)
    os._exit(0)


def boinc_send_trickle_up(variety, text):
    _setup()
    if _state["dir"] is None:
        return 0
    if "\n" in variety:
        return -1
    d = _path("trickle_up")
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    seq = _state["trickle_seq"]
    for name in os.listdir(d):
        head = name.split(".", 1)[0]
        if head.isdigit():
            seq = max(seq, int(head))
    seq += 1
    _state["trickle_seq"] = seq
    _write(os.path.join("trickle_up", "%08d.msg" % seq), variety + "\n" + text)
    return 0


def boinc_receive_trickle_down():
    """The oldest trickle-down message (deleted once read), or None."""
    _setup()
    if _state["dir"] is None:
        return None
    d = _path("trickle_down")
    try:
        names = sorted(n for n in os.listdir(d) if not n.startswith(".") and not n.endswith(".tmp"))
    except OSError:
        return None
    for name in names:
        path = os.path.join(d, name)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            os.unlink(path)
        except OSError:
            continue
        return text
    return None


def boinc_waiting_for_network(waiting):
    """BOINC's API since May 2026: say the program waits for the network (the client then
    tells the volunteer a task needs it), or no longer does."""
    _setup()
    waiting = bool(waiting)
    if _state["want_network"] != waiting:
        _state["want_network"] = waiting
        _write_status(force=True)


def boinc_network_suspended():
    """True while the client keeps the network off (BOINC_STATUS.network_suspended)."""
    _setup()
    return _state["dir"] is not None and os.path.exists(_path("network_suspended"))


# The names BOINC's API had before May 2026, kept for programs that still call them.
def boinc_need_network():
    boinc_waiting_for_network(True)
    return 0


def boinc_network_poll():
    """0 while the network is available, 1 while the client keeps it off."""
    return 1 if boinc_network_suspended() else 0


def boinc_network_done():
    boinc_waiting_for_network(False)


def boinc_network_usage(sent, received):
    """Ignored, as BOINC's client ignored it."""
