"""BOINC's input and output templates, read in one place.

The output template says which result files a task uploads (and which are optional); the
input template carries the workunit's ``rsc_*`` bounds. Everything that reads a template
(run-local, the real-client project, validate) reads it through here.
"""

from __future__ import annotations

from boincvm.xmlio import parse_xml, text_of


def optional_outputs(data: bytes) -> set[str]:
    """The open names an output template marks ``<optional/>``."""
    root = parse_xml(data, what="output template")
    result = root.find("result")
    names: set[str] = set()
    for ref in result.findall("file_ref") if result is not None else []:
        on = ref.find("open_name")
        if on is not None and ref.find("optional") is not None:
            names.add(text_of(on))
    return names
