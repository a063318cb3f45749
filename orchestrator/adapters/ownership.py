"""Whose a data-centre site's applications on a cluster are: the decision on a cluster's
owner mark, apart from the marks themselves (a RayService annotation: :mod:`.kuberay`; a
Ray job's metadata: :mod:`.ray_owner`), which both adapters read and write their own way.

Two control planes (staging and production, a copy restored from a backup) given one site
name on one cluster would each apply its config over the other's, forever: each marks the
site's applications with its store's id, and one marked by another is left alone until an
operator takes it over.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.adapters.serve_config import DataCentreError


class OwnedElsewhere(DataCentreError):
    """The site's applications on its cluster are marked as another control plane's: two
    control planes (staging and production, a copy restored from a backup) given one site
    name on one cluster would each apply its config over the other's, forever. Nothing
    there is changed until an operator takes it over (the Site's ``takeOverFrom``)."""

    retryable = False

    def __init__(self, where: str, site: str, other: str, ours: str) -> None:
        super().__init__(
            f"{where} is owned by another edgeplane control plane (owner {other}; this one is {ours}): "
            f"nothing of site {site!r} there is changed. Two control planes given one site on one cluster "
            f"would undo each other's Serve config; to take it over, set the Site's spec.takeOverFrom: {other}")
        self.other = other
        self.ours = ours


@dataclass(frozen=True)
class Ownership:
    """Whose a site's applications on a cluster are: ``owner``, this control plane's id
    (its store's, kept across restarts and restores), and ``take_over_from``, the id of
    another control plane whose mark an operator chose to take over (the Site's
    ``takeOverFrom``). The mark itself is the adapter's (a RayService annotation, a Ray job's
    metadata); the decision on it is this, free of I/O."""

    owner: str
    site: str
    take_over_from: str | None = None

    def marks(self, marked: str | None, where: str) -> bool:
        """Whether the mark ``marked`` (None: none, a first use or an earlier release's
        cluster) is to be written ours; :class:`OwnedElsewhere` when it is another's that
        is not being taken over."""
        if marked == self.owner:
            return False
        if marked is None or marked == self.take_over_from:
            return True
        raise OwnedElsewhere(where, self.site, marked, self.owner)
