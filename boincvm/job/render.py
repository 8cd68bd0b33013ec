"""Writing a vm job as XML (``templates/vm_job.xml.j2``).

Not imported by :mod:`boincvm.job`: the wrapper parses jobs but never renders one, and
jinja2 is not part of the wrapper (zip application or frozen executable). Callers that
render import this module themselves; tests/unit/test_layout.py guards that the wrapper
never reaches it.
"""

from __future__ import annotations

from boincvm.job.model import VmJob
from boincvm.render import render


def render_job(job: VmJob) -> str:
    """Render a job as a vm job XML document (see ``templates/vm_job.xml.j2``)."""
    return render("vm_job.xml.j2", job=job)
