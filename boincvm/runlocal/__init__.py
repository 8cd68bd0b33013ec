"""run-local: plays the BOINC client for one workunit, here.

:mod:`.emulator` runs the wrapper under the client emulator (:class:`boincvm.boinc.client.LocalClient`),
:mod:`.real_client` under Debian's real ``boinc-client`` against a loopback project
(:mod:`.loopback`); :mod:`.request` is what both take and give, :mod:`.task` the slot task
built from the artefacts, :mod:`.faults` the faults injected at chosen moments, :mod:`.phases`
the wrapper's phases as the live view tells them.
"""
