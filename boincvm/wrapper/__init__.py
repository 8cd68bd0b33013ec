"""The wrapper: the program the BOINC client runs in a slot, driving one VM through a backend.

Written only against the BOINC app API (:mod:`boincvm.boinc`) and the backend interface
(:mod:`boincvm.hypervisor.base`). :mod:`.main` is the entry point, :mod:`.steps` the five
steps (:mod:`.run_loop` the main loop, :mod:`.finish` the end, :mod:`.task` what they share),
:mod:`.checkpoint` the crash-safe checkpoint record (:mod:`.app_checkpoint` the program's own
checkpoint files), :mod:`.status` the typed status file run-local reads, :mod:`.guest_contract`
the guest program's files read defensively (:mod:`.guest_files` fetches them, :mod:`.progress`
forwards them, :mod:`.guest_output` the program's output as it runs), :mod:`.guest_api` the
guest API's files (:mod:`.guest_api_link` the wrapper's end of it: the checkpoint handshake,
finish, trickles).
"""
