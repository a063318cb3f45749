"""Which name a site may have: a DNS label, on both ends.

The control plane refuses a join whose site name breaks it (the name becomes a stored Site,
a certificate's subject, a path segment of the API), and the agent checks ``--site`` against
it before starting: an agent with such a name would be refused at every join. Both name the
character that makes a look-alike one.
"""

from __future__ import annotations

import re

from edgeplane_proto import lookalike

PATTERN = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # fullmatch: "$" would take "edge-1\n"


def refusal(name: str) -> str | None:
    """Why ``name`` cannot name a site, or None when it can, naming the first character that
    is not ASCII of a look-alike (:func:`lookalike.explain`). The callers say whose name it is."""
    if PATTERN.fullmatch(name):
        return None
    return f"{name!r} must be a DNS label: lowercase letters, digits and '-', at most 63 characters{lookalike.explain(name)}"
