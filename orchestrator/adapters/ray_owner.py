"""Which control plane a site's Serve applications on a Ray cluster are, as the cluster says.

Two control planes given one site name on one cluster (staging and production, a copy
restored from a backup and the original) each took the site's applications as its own and
applied its config over the other's at every pass, forever. The cluster must say whose they
are, in a place every control plane reads without restarting a replica: a Serve
application's fields all do (``runtime_env``, ``args``, a name; a ``user_config`` fails
where a deployment has no ``reconfigure``), and the Serve config keeps no field of its own.
Ray's Jobs API keeps a job's ``metadata`` for as long as the cluster (its GCS) lives, as
long as it keeps the Serve config: the mark is a job that runs ``true`` once (no CPU, no
replica touched), its metadata naming the site and the owner's id. The newest such job of a
site is its mark; taking a site over submits a newer one. A cluster whose dashboard has no
Jobs API (404) cannot be marked: its sites are driven as before owners, said once in the log.
One whose Jobs API fails (its job manager's 500 or 503) while its Serve API answers is read
as before, and changed only once the mark reads again: the mark guards writes.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from orchestrator.adapters.ownership import OwnedElsewhere, Ownership
from orchestrator.adapters.serve_config import RayServeError, RayUnreachable

log = logging.getLogger(__name__)

JOBS_PATH = "/api/jobs/"
OWNER_KEY = "edgeplane.io/owner"
SITE_KEY = "edgeplane.io/site"
#: How long an observation takes a mark read as this control plane's (or unmarked) for read
#: (:class:`OwnerMark`).
RECHECK_S = 60.0
#: The adapter's request to the dashboard (method, path, json=...), raising its errors.
Request = Callable[..., Awaitable[httpx.Response]]


class OwnerMark:
    """A site's mark on one cluster, as its actuator reads and writes it. The Jobs API lists
    every job the cluster ran (thousands, on a busy one): an apply reads the mark first,
    every time, since a takeover must stop it (:meth:`before_apply`); an observation changes
    nothing, so one reads it only if it has not read as this control plane's (or unmarked)
    in the last ``recheck_s`` on ``clock`` (:meth:`before_read`). The job manager may fail
    (a 500, a 503) while the Serve API answers: what runs is then read as before, the
    failure said in the log once, and an apply waits for the mark to read."""

    def __init__(self, ownership: Ownership, request: Request, dashboard_url: str, recheck_s: float = RECHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ownership, self._request, self._dashboard_url = ownership, request, dashboard_url
        self._recheck_s, self._clock = recheck_s, clock
        self._unmarkable = False  # the dashboard has no Jobs API: driven as before owners
        self._unread = ""  # why the mark could not be read at the last observation
        self._read_at: float | None = None  # when it last read as not another's (None: never, or another's)

    async def before_apply(self) -> None:
        """The cluster marked as this control plane's for the site if it is not yet;
        :class:`OwnedElsewhere` if it is another's."""
        if await self._marks():
            await mark(self._request, self._ownership, self._dashboard_url)

    async def before_read(self) -> None:
        """:class:`OwnedElsewhere` if the cluster is another's, as read at most every ``recheck_s``."""
        if self._read_at is not None and self._clock() - self._read_at < self._recheck_s:
            return
        try:
            await self._marks()
        except RayServeError as exc:
            if str(exc) != self._unread:
                log.warning("%s; what runs there is read as before, and nothing is changed there until it reads", exc)
            self._unread = str(exc)
            return
        self._unread = ""

    async def _marks(self) -> bool:
        if self._unmarkable:
            return False
        try:
            to_mark = await marks(self._request, self._ownership, self._dashboard_url)
        except OwnedElsewhere:
            self._read_at = None  # read again at the next observation
            raise
        self._unmarkable = to_mark is None
        self._read_at = self._clock()
        return bool(to_mark)


async def marks(request: Request, ownership: Ownership, dashboard_url: str) -> bool | None:
    """Whether the cluster is to be marked as ``ownership.owner``'s for its site (unmarked,
    or taken over); :class:`~orchestrator.adapters.ownership.OwnedElsewhere` if it is
    another's; None if the dashboard has no Jobs API, which is said in the log. A Jobs API
    that fails otherwise is a :class:`RayServeError` saying the mark could not be read."""
    try:
        jobs = (await request("GET", JOBS_PATH)).json()
    except RayUnreachable as exc:  # a 503 of the job manager, say, where the Serve API may well answer
        raise RayServeError(f"site {ownership.site}'s owner mark on {dashboard_url} could not be read ({JOBS_PATH}): {exc}") from exc
    except RayServeError as exc:
        if exc.status_code != 404:
            raise RayServeError(f"site {ownership.site}'s owner mark could not be read: {exc}", exc.status_code) from exc
        log.warning("the Ray dashboard at %s has no Jobs API (%s): site %s's applications there cannot be marked as "
                    "this control plane's, nor another control plane's given the site told apart", dashboard_url, JOBS_PATH, ownership.site)
        return None
    except ValueError as exc:
        raise RayServeError(f"site {ownership.site}'s owner mark could not be read: {dashboard_url} answered non-JSON to {JOBS_PATH}") from exc
    return ownership.marks(marked_owner(jobs, ownership.site), f"Ray cluster at {dashboard_url}")


async def mark(request: Request, ownership: Ownership, dashboard_url: str) -> None:
    """Mark the cluster as ``ownership.owner``'s for its site."""
    log.info("marking site %s's applications on %s as this control plane's (%s)", ownership.site, dashboard_url, ownership.owner)
    await request("POST", JOBS_PATH, json=mark_request(ownership))


def marked_owner(jobs: Any, site: str) -> str | None:
    """The owner the newest mark of ``site`` among the cluster's ``jobs`` (the Jobs API's
    list) names; None if none does. Marks submitted in the same millisecond are ordered by
    their ids, which name their owners, so every reader takes the same one."""
    marks = []
    for job in jobs if isinstance(jobs, list) else ():
        metadata = job.get("metadata") if isinstance(job, Mapping) else None
        if isinstance(metadata, Mapping) and metadata.get(SITE_KEY) == site and isinstance(metadata.get(OWNER_KEY), str):
            marks.append((job.get("start_time") or 0, str(job.get("submission_id") or ""), metadata[OWNER_KEY]))
    return max(marks)[2] if marks else None


def mark_request(ownership: Ownership) -> dict[str, Any]:
    """The job that marks ``ownership.site``'s applications as ``ownership.owner``'s."""
    return {
        "entrypoint": "true",
        "submission_id": f"edgeplane-owner-{ownership.site}-{ownership.owner}-{secrets.token_hex(4)}",
        "metadata": {SITE_KEY: ownership.site, OWNER_KEY: ownership.owner},
        "entrypoint_num_cpus": 0,
    }
