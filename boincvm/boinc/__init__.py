"""The BOINC side of boincvm, in pure Python.

* :mod:`~boincvm.boinc.api` -- :class:`BoincApp`, what the wrapper speaks to the client;
* :mod:`~boincvm.boinc.client` -- :class:`LocalClient`, the client side run-local's emulator speaks;
* :mod:`~boincvm.boinc.shm`, :mod:`~boincvm.boinc.init_data`, :mod:`~boincvm.boinc.files` --
  the shared-memory channels, ``init_data.xml`` and the slot files both sides share.
"""
