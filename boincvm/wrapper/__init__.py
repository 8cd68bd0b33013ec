"""The wrapper: the program the BOINC client runs in a slot, driving one VM through a backend.

Written only against the BOINC app API (:mod:`boincvm.boinc`) and the backend interface
(:mod:`boincvm.hypervisor.base`). :mod:`.main` is the entry point, :mod:`.steps` the five
steps, :mod:`.checkpoint` the crash-safe checkpoint record, :mod:`.status` the typed status
file run-local reads, :mod:`.guest_contract` the guest program's files read defensively.
"""
