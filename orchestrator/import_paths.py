"""Ray Serve's rule for an application's import path, held once.

A ray-serve variant's ``importPath`` is checked three times: by the manifest when it is
applied, by the Serve adapter when a pass renders the application, and by Ray Serve when
its cluster is given the config. Where two disagreed, a path the first took failed later,
in a worse place: ``pkgapp`` was stored and then failed every reconcile pass, and
``pkg.app``, which Ray Serve takes, was refused by the adapter. So the manifest and the
adapter both hold Ray Serve's own rule (``import_path_format_valid`` in
``ray/serve/schema.py``): at most one colon, neither first nor last; without a colon, at
least one dot, neither first nor last, between the module and the attribute.
"""

from __future__ import annotations

#: What a user is told to write.
FORMS = "'package.module:attribute' (or 'package.module.attribute')"


def problem(path: str) -> str | None:
    """Why Ray Serve refuses ``path`` as an application's import path; None when it takes it."""
    if ":" in path:
        if path.count(":") > 1:
            return f"it has more than one colon; write {FORMS}"
        if path.startswith(":") or path.endswith(":"):
            return f"it starts or ends with a colon; write {FORMS}"
        return None
    if "." not in path:
        return f"it names no module, only an attribute; write {FORMS}"
    if path.startswith(".") or path.endswith("."):
        return f"it starts or ends with a dot; write {FORMS}"
    return None
