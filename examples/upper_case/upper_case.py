#!/usr/bin/env python3
"""upper_case: the Python twin of upper_case.c, written against boincvm's ``boinc`` module.

    upper_case.py [STEP_SECONDS [BLOCK_BYTES [FINISH_STATUS [trickle]]]]

Same input, same output bytes, same checkpoint file as the C program.
"""

import os
import sys
import time

import boinc

CHECKPOINT_FILE = "upper_case_state"
FPOPS_PER_BYTE = 1e6


def do_checkpoint(out, nchars):
    with open("upper_case_state.tmp", "w") as f:
        f.write("%d\n" % nchars)
        f.flush()
        os.fsync(f.fileno())
    out.flush()
    os.fsync(out.fileno())
    os.rename("upper_case_state.tmp", boinc.boinc_resolve_filename(CHECKPOINT_FILE))


def main(argv):
    step = float(argv[1]) if len(argv) > 1 else 0.2
    block = max(1, int(argv[2])) if len(argv) > 2 else 64
    finish_status = int(argv[3]) if len(argv) > 3 else 0
    trickle = len(argv) > 4 and argv[4] == "trickle"
    boinc.boinc_init()
    input_path = boinc.boinc_resolve_filename("in")
    output_path = boinc.boinc_resolve_filename("out")
    size = os.path.getsize(input_path)
    nchars = 0
    try:
        with open(boinc.boinc_resolve_filename(CHECKPOINT_FILE)) as f:
            nchars = int(f.read().strip() or 0)
    except (OSError, ValueError):
        nchars = 0
    if not 0 <= nchars <= size:
        nchars = 0
    infile = open(input_path, "rb")
    if nchars:
        infile.seek(nchars)
        os.truncate(output_path, nchars)
        out = open(output_path, "ab")
    else:
        out = open(output_path, "wb")
    sys.stderr.write("upper_case: %s at byte %d\n" % ("resuming" if nchars else "starting", nchars))
    while True:
        data = infile.read(block)
        if not data:
            break
        out.write(data.upper())
        nchars += len(data)
        time.sleep(step)
        if boinc.boinc_time_to_checkpoint():
            do_checkpoint(out, nchars)
            boinc.boinc_checkpoint_completed()
        boinc.boinc_ops_cumulative(nchars * FPOPS_PER_BYTE, 0)
        if size:
            boinc.boinc_fraction_done(nchars / size)
    out.close()
    if trickle:
        boinc.boinc_send_trickle_up("upper_case", "<chars>done</chars>")
    boinc.boinc_fraction_done(1)
    boinc.boinc_finish(finish_status)


if __name__ == "__main__":
    main(sys.argv)
