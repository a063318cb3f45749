"""Which artifact versions the control plane must go on serving, from what a pass knows.

The artifact catalog (``orchestrator.artifacts.catalog``) remembers each version it checked
so that ``/v1/artifacts/<sha256>`` serves only checked bytes, and so that a file is not
hashed again at every pass. A version stays needed while a stored Model names it (the next
pass sends it), while an agent's last assignment set names it (an agent kept on an older
version during a rollout downloads it again after a restart or an eviction from its cache),
and while a data centre's applied Serve application names it (each new Ray replica downloads
it). Any other was checked for a Model that has moved on: kept, the catalog would grow by
one entry per version for as long as the control plane runs.

It also resolves, each pass, where consumers download each version from (checking local
artifacts against their sha256 on the way).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from orchestrator.adapters import serve_config
from orchestrator.agents import model as agent_model
from orchestrator.artifacts import catalog as catalog_mod
from orchestrator.manifests import schema
from orchestrator.reconciler import snapshot as snap


def live(models: Mapping[str, schema.ModelSpec], sent: Iterable[Iterable[agent_model.Assignment]],
         applied: Mapping[str, Iterable[serve_config.ServeAppSpec]]) -> frozenset[str]:
    """The sha256 of every version the stored ``models`` name, that an agent was last ``sent``
    (one set per site) or that a data centre was last ``applied``."""
    named = {v.artifact.sha256 for spec in models.values() for v in spec.variants if v.artifact is not None}
    pushed = {a.sha256 for assignments in sent for a in assignments if a.sha256}
    deployed = {app.sha256 for apps in applied.values() for app in apps if app.sha256}
    return frozenset(named | pushed | deployed)


def resolve(catalog: catalog_mod.ArtifactCatalog, models: Mapping[str, schema.ModelSpec], sent: Mapping[str, str]
            ) -> tuple[dict[tuple[str, str], snap.ArtifactRef], dict[str, str], dict[str, str]]:
    """Where each variant of the stored ``models`` is downloaded from, and of each version
    agents were ``sent`` (sha256 -> its source) this control plane's URL, or why it has
    none: a version a halted rollout keeps may be named by no stored Model, and was sent by
    a leader that may be gone; one without is sent with the URL it was sent with. A new
    local artifact is hashed here: call it off the event loop."""
    versions, unservable = {}, {}
    for sha256, uri in sent.items():
        try:
            versions[sha256] = catalog.register(uri, sha256)
        except (catalog_mod.ArtifactError, OSError) as exc:
            unservable[sha256] = str(exc)
    out = {}
    for name, spec in models.items():
        for v in spec.variants:
            if v.artifact is None:
                continue
            try:
                out[(name, v.name)] = snap.ArtifactRef(catalog.register(v.artifact.uri, v.artifact.sha256), hosts=catalog.allowed_hosts)
            except (catalog_mod.ArtifactError, OSError) as exc:
                out[(name, v.name)] = snap.ArtifactRef(None, f"Model {name} variant {v.name}: {exc}")
    return out, versions, unservable
