"""A real BOINC project, as its administrator's tools see it: ``boincvm deploy``'s side.

What boincvm made (app versions, workunits) goes into an existing project directory through
the project's own tools (``bin/xadd``, ``bin/update_versions``, ``bin/dir_hier_path``,
``bin/create_work``), never by writing the project's database. An artefact-side part: it
imports the artefacts (:mod:`boincvm.appversion`, :mod:`boincvm.workunit`) and the ground,
never a runner.
"""
