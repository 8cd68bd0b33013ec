"""Safe XML reading: no DTDs, no entity expansion, no network, clear errors.

Every XML document boincvm reads (vm jobs, templates, version.xml, init_data.xml) goes
through :func:`parse_xml`, built on defusedxml. BOINC's own parsers understand only the
five predefined entities and character references; so do we.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import defusedxml
import defusedxml.ElementTree as DET

from boincvm.bounds import read_file_bytes
from boincvm.errors import XmlError

#: Refuse documents bigger than this (a vm job or template is a few KB).
MAX_XML_BYTES = 16 * 1024 * 1024


def parse_xml(data: bytes | str, *, what: str) -> ET.Element:
    """Parse an XML document and return its root element.

    Args:
        data: the document.
        what: how to name the document in errors ("vm job file job.xml").

    Raises:
        XmlError: malformed, too big, or declares a DTD or entities (XXE, billion laughs).
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > MAX_XML_BYTES:
        raise XmlError(
            f"{what} is {len(raw)} bytes, more than the {MAX_XML_BYTES} bytes an XML file may have",
            hint="a BOINC XML file is a few KB; check that this is the right file",
        )
    try:
        root: ET.Element = DET.fromstring(raw, forbid_dtd=True, forbid_entities=True, forbid_external=True)
        return root
    except defusedxml.DTDForbidden:
        raise XmlError(
            f"{what} declares a DTD, which boincvm refuses",
            hint="remove the <!DOCTYPE ...> line; BOINC files never need one (it opens XXE, entity bombs)",
        ) from None
    except (defusedxml.EntitiesForbidden, defusedxml.ExternalReferenceForbidden):
        raise XmlError(
            f"{what} declares entities, which boincvm refuses",
            hint="use the predefined escapes &amp; &lt; &gt; &quot; &apos; instead of declared entities",
        ) from None
    except (LookupError, ValueError) as exc:  # expat: an encoding Python has no codec for
        raise XmlError(
            f"{what} declares an encoding boincvm cannot read ({exc})",
            hint='save it as UTF-8 and declare <?xml version="1.0" encoding="UTF-8"?> (or no declaration)',
        ) from None
    except ET.ParseError as exc:
        line, col = exc.position
        raise XmlError(
            f"{what} is not well-formed XML (line {line}, column {col + 1})",
            hint="escape & as &amp; and < as &lt; in element text",
        ) from None


def read_xml(path: Path, *, what: str) -> ET.Element:
    """Read and parse an XML file.

    Raises:
        InputError: the file cannot be read.
        XmlError: see :func:`parse_xml`.
    """
    return parse_xml(read_bytes(path, what=what), what=f"{what} {path.name}")


def text_of(elem: ET.Element) -> str:
    """The element's text, stripped (BOINC strips whitespace around values)."""
    return (elem.text or "").strip()


def is_flag_true(elem: ET.Element) -> bool | None:
    """BOINC boolean semantics: present-and-empty or an integer > 0 is true; 0 is false.

    Returns None when the text is neither empty nor an integer.
    """
    text = text_of(elem)
    if text == "":
        return True
    if text.lower() in ("true", "yes"):
        return True
    if text.lower() in ("false", "no"):
        return False
    try:
        return int(text) > 0
    except ValueError:
        return None


def read_bytes(path: Path, *, what: str) -> bytes:
    """Read a file for parsing: a regular file (no FIFO, device or directory) of bounded size.

    Raises:
        InputError: missing, unreadable, not a regular file, or bigger than an XML file may be.
    """
    return read_file_bytes(path, what=what, max_bytes=MAX_XML_BYTES)


def escape_text(value: object) -> str:
    """Escape text for an XML element the way BOINC's parser undoes it (&amp; &lt; &gt; only)."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
