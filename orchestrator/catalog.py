"""Desired state: applying, reading and deleting user objects on top of the store.

The HTTP API and the in-process harness both go through here, so the rules hold no
matter who calls: a request is validated as a whole (every document, and every reference
of the valid ones against stored plus incoming objects, all reported together) before
anything is written, and the write is one store transaction, so a file with any error
applies nothing. The validation runs inside that transaction, under the lock every writer
of the store takes (every replica's), so what it judged is what the write lands on.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic

from orchestrator.agents import model as agent_model
from orchestrator.distill import capture
from orchestrator.manifests import loader, references, schema
from orchestrator.manifests.errors import ManifestError, ManifestIssue
from orchestrator.store import sqlite as store_mod

#: URL/CLI spellings of each kind.
KIND_ALIASES = {
    "site": "Site",
    "sites": "Site",
    "model": "Model",
    "models": "Model",
    "modeldeployment": "ModelDeployment",
    "modeldeployments": "ModelDeployment",
    "deployment": "ModelDeployment",
    "deployments": "ModelDeployment",
    "md": "ModelDeployment",
}
PLURAL = {"Site": "sites", "Model": "models", "ModelDeployment": "modeldeployments"}
MAX_OBJECTS_PER_APPLY = 1_000
T = TypeVar("T")


class UnknownKind(ValueError):
    pass


class InUse(Exception):
    """Deleting an object that others still reference."""


def resolve_kind(text: str) -> str:
    kind = KIND_ALIASES.get(text.lower())
    if kind is None:
        raise UnknownKind(f"unknown kind {text!r}; use one of: sites, models, modeldeployments")
    return kind


#: What else the event log is about: tokens (created, revoked), the control plane
#: (leadership) and captured cascade records (read, erased).
EVENT_KIND_ALIASES = {**KIND_ALIASES, "token": "Token", "tokens": "Token", "controlplane": "ControlPlane",
                      "capturedrecord": "CapturedRecord", "capturedrecords": "CapturedRecord", "captures": "CapturedRecord"}


def resolve_event_kind(text: str) -> str:
    """The kind of ``events --kind``: an object kind, or another thing the log records."""
    kind = EVENT_KIND_ALIASES.get(text.lower())
    if kind is None:
        raise UnknownKind(f"unknown kind {text!r}; use one of: sites, models, modeldeployments, tokens, controlplane, captures")
    return kind


@dataclass(frozen=True)
class ApplyResult:
    outcomes: list[store_mod.WriteOutcome]
    dry_run: bool


def read_each(objs: Iterable[store_mod.StoredObject], parse: Callable[[store_mod.StoredObject], T]) -> tuple[dict[str, T], dict[str, str]]:
    """``objs`` as this version's schema reads them, by name, and why each that it no longer
    reads does not. Stored specs are read without the rules only manifests are held to
    (:data:`schema.MANIFEST`), yet one stored by an earlier version may still break a rule
    made stricter since: it is that object's problem, never every reader's."""
    read: dict[str, T] = {}
    unreadable: dict[str, str] = {}
    for o in objs:
        try:
            read[o.name] = parse(o)
        except ValueError as exc:  # pydantic's ValidationError is one
            unreadable[o.name] = why_unreadable(exc)
    return read, unreadable


class Unreadable(ValueError):
    """A stored object this version does not read (an earlier one stored it under rules made
    stricter since): a request that needs it is refused, naming it, until it is applied again
    or deleted; the reconciler puts the fleet on hold instead (``status.phase: Unreadable``,
    :mod:`orchestrator.reconciler.hold`)."""


def read_stored(obj: store_mod.StoredObject, parse: Callable[[store_mod.StoredObject], T]) -> T:
    """``obj`` as ``parse`` reads it, or :class:`Unreadable` naming it and saying why."""
    try:
        return parse(obj)
    except ValueError as exc:  # pydantic's ValidationError is one
        raise Unreadable(f"{obj.kind} {obj.name!r} is stored in a form this version does not read ({why_unreadable(exc)}); "
                         f"apply it again or delete it") from None


def why_unreadable(exc: ValueError) -> str:
    """A validation error as one line: each field and its message."""
    if isinstance(exc, pydantic.ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors(include_url=False))
    return " ".join(str(exc).split())


def stored_models(store: store_mod.Store) -> tuple[dict[str, schema.ModelSpec], dict[str, str]]:
    """The stored Models by name, and why each this version no longer reads does not."""
    return read_each(store.list("Model"), parse_model)


def stored_deployments(store: store_mod.Store, models: Iterable[str]) -> dict[str, schema.ModelDeploymentSpec]:
    """The stored deployments of ``models`` that this version reads, by name."""
    wanted = set(models)
    return read_each((o for o in store.list("ModelDeployment") if o.spec.get("model") in wanted), parse_deployment)[0] if wanted else {}


def check(reading: loader.Reading, models: Mapping[str, schema.ModelSpec],
          deployments: Mapping[str, schema.ModelDeploymentSpec] | None = None,
          unreadable_models: Iterable[str] = ()) -> list[ManifestIssue]:
    """Every problem of an apply, given the stored ``models`` and ``deployments`` (at least
    those of the Models it brings): each document's own, the references of the valid ones,
    and what its Models would break in stored deployments, by file then document. A stored
    Model this version no longer reads (``unreadable_models``) exists as far as names go, as
    a refused one does: a deployment naming it is not judged against its variants."""
    more = [issue for d in reading.documents if (issue := _version_issue(d)) is not None]
    count = len(reading.documents) + len(reading.refused)
    if count > MAX_OBJECTS_PER_APPLY:
        first = (reading.documents or reading.refused)[0].file
        more.append(ManifestIssue(first, None, "", None, f"more than {MAX_OBJECTS_PER_APPLY} objects in one apply"))
    elif reading.complete:  # past a break in the text, any Model may be defined: references are not judged
        brought = {d.name for d in reading.documents if d.kind == "Model"}
        unread = reading.refused_names() | {("Model", name) for name in unreadable_models if name not in brought}
        more.extend(references.check_references(reading.documents, models, unread, deployments))
    return reading.ordered(more)


def validate(store: store_mod.Store, reading: loader.Reading) -> None:
    """Raise :class:`ManifestError` unless the documents can be applied together."""
    incoming = [d.name for d in reading.documents if d.kind == "Model"]
    models, unreadable = stored_models(store)
    issues = check(reading, models, stored_deployments(store, incoming), unreadable)
    if issues:
        raise ManifestError(issues)


#: What get returns: a store version, a 64-bit integer. ``str.isdigit`` is not the test: it
#: takes '²' and numbers past the digits ``int`` reads, which ``writes_for`` then failed on.
VERSION_PATTERN = re.compile(r"[0-9]{1,19}")


def _version_issue(d: loader.LoadedDocument) -> ManifestIssue | None:
    version = d.doc.metadata.resourceVersion
    if version is None or VERSION_PATTERN.fullmatch(version):
        return None
    return ManifestIssue(d.file, d.index, "metadata.resourceVersion", d.line_of(("metadata", "resourceVersion")),
                         "must be a number as returned by get")


def writes_for(docs: Iterable[loader.LoadedDocument]) -> list[store_mod.ObjectWrite]:
    out = []
    for d in docs:
        meta = d.doc.metadata
        if (issue := _version_issue(d)) is not None:
            raise ManifestError([issue])
        out.append(
            store_mod.ObjectWrite(
                kind=d.kind,
                name=d.name,
                labels=dict(meta.labels),
                spec=d.doc.spec.model_dump(mode="json", exclude_none=True),
                expected_version=int(meta.resourceVersion) if meta.resourceVersion is not None else None,
                annotations=dict(meta.annotations),
            )
        )
    return out


def apply_reading(
    store: store_mod.Store,
    reading: loader.Reading,
    *,
    actor: str,
    reason: str = "apply",
    dry_run: bool = False,
) -> ApplyResult:
    """Apply what was read, or raise :class:`ManifestError` with every problem and apply nothing.

    Applies and deletes check against what is stored, then write. The check runs in the
    store's write transaction, so no write lands in between, whichever replica makes it (a
    Model deleted between the check of a deployment naming it and that deployment's write;
    two Models' changes each judged against the other's old variants)."""

    def judged() -> list[store_mod.ObjectWrite]:
        validate(store, reading)
        return writes_for(reading.documents)

    outcomes = store.apply(judged, store_mod.Event(actor, "apply", "", "", reason), dry_run=dry_run)
    return ApplyResult(outcomes, dry_run)


def apply_documents(
    store: store_mod.Store,
    docs: list[loader.LoadedDocument],
    *,
    actor: str,
    reason: str = "apply",
    dry_run: bool = False,
) -> ApplyResult:
    return apply_reading(store, loader.Reading.of(docs), actor=actor, reason=reason, dry_run=dry_run)


def delete_object(store: store_mod.Store, kind: str, name: str, *, actor: str, reason: str = "delete",
                  expected_version: int | None = None) -> store_mod.WriteOutcome:
    """Delete one object; with ``expected_version``, only if it still has that resourceVersion
    (:class:`Conflict` otherwise)."""
    def unused() -> None:  # in the delete's transaction, as an apply's check (apply_reading)
        if kind == "Model" and (users := _users(store).get(name)):
            raise InUse(f"Model {name!r} is used by ModelDeployment {', '.join(users)}; delete those first")

    return store.delete(kind, name, store_mod.Event(actor, "delete", kind, name, reason), expected_version, check=unused)


def delete_site_abandoning(store: store_mod.Store, name: str, *, actor: str, reason: str = "delete", keep_site: bool = False) -> bool:
    """Delete Site ``name`` if it is still stored (unless ``keep_site``), and give up removing
    the Serve applications it left (they run on, owned by nothing, if their cluster is still
    there): for a data centre whose cluster is gone for good, whose removal would otherwise be
    tried forever. ``keep_site``: only those left on targets the Site was moved away from.
    Both in one transaction: a store that fails the second keeps the Site as well. Whether
    the Site was deleted; :class:`NotFound` when neither it nor a removal was left."""
    deleted, abandoned = store.abandon_deleted_site(
        name, store_mod.Event(actor, "applications-abandoned", "Site", name, reason, {"note": "its Serve applications are no longer removed"}),
        deleting=None if keep_site else store_mod.Event(actor, "delete", "Site", name, reason))
    if not (deleted or abandoned):
        if keep_site:
            raise store_mod.NotFound(f"no removal of the applications Site {name!r} left elsewhere is pending")
        raise store_mod.NotFound(f"Site {name!r} does not exist, and no removal of its applications is pending")
    return deleted


def _users(store: store_mod.Store, going: Iterable[str] = ()) -> dict[str, list[str]]:
    """The deployments that stay (all but those named in ``going``), sorted, by the model
    they use: read once for a whole bundle, which may name hundreds of Models, inside the
    delete's transaction, where every other writer waits."""
    leaving = set(going)
    out: dict[str, list[str]] = {}
    for o in store.list("ModelDeployment"):  # sorted by name
        if isinstance(model := o.spec.get("model"), str) and o.name not in leaving:
            out.setdefault(model, []).append(o.name)
    return out


#: deletion order within one bundle: dependants first (a deployment before its model)
DELETE_ORDER = {"ModelDeployment": 0, "Model": 1, "Site": 2}


def delete_documents(store: store_mod.Store, docs: list[loader.LoadedDocument], *, actor: str, reason: str = "delete",
                     missing_ok: bool = False) -> list[store_mod.WriteOutcome]:
    """Delete every object the documents name, in one transaction: all of them or none.
    A Model still used by a deployment outside the bundle refuses the bundle (:class:`InUse`),
    as does an object that does not exist unless ``missing_ok``, and one that changed since
    the ``metadata.resourceVersion`` its document gives (:class:`Conflict`: what ``get``
    printed is deleted only as it was read, as it is applied only so)."""
    targets = sorted(dict.fromkeys((d.kind, d.name) for d in docs), key=lambda t: DELETE_ORDER[t[0]])
    expected = _expected_versions(docs)
    going = {name for kind, name in targets if kind == "ModelDeployment"}
    def unused() -> None:  # in the delete's transaction, as an apply's check (apply_reading)
        users_of = _users(store, going) if any(kind == "Model" for kind, _ in targets) else {}
        for kind, name in targets:
            if kind == "Model" and (users := users_of.get(name)):
                raise InUse(f"Model {name!r} is used by ModelDeployment {', '.join(users)}, which the bundle does not delete; "
                            "nothing was deleted")

    try:
        return store.delete_many(targets, store_mod.Event(actor, "delete", "", "", reason), missing_ok=missing_ok, check=unused,
                                 expected=expected)
    except store_mod.NotFound as exc:
        raise store_mod.NotFound(f"{exc}; nothing was deleted") from None
    except store_mod.Conflict as exc:
        raise store_mod.Conflict(f"{exc}; nothing was deleted") from None


def _expected_versions(docs: list[loader.LoadedDocument]) -> dict[tuple[str, str], int]:
    """The resourceVersion each document of a delete gives its object; :class:`ManifestError`
    for one that is no version, or two documents that give one object different ones."""
    issues, out = [], {}
    for d in docs:
        if (issue := _version_issue(d)) is not None:
            issues.append(issue)
        elif (given := d.doc.metadata.resourceVersion) is not None:
            if out.setdefault((d.kind, d.name), int(given)) != int(given):
                issues.append(ManifestIssue(d.file, d.index, "metadata.resourceVersion", d.line_of(("metadata", "resourceVersion")),
                                            f"another document names {d.kind} {d.name!r} at resourceVersion {out[(d.kind, d.name)]}"))
    if issues:
        raise ManifestError(issues)
    return out


def rfc3339(ts: float | None) -> str | None:
    """A stored Unix time as users read times in Kubernetes: RFC 3339 in UTC, to the second.
    A time no date can show (a token's expiry stored by an earlier version, which took any
    number) reads as None: one bad row must not break every listing it is in."""
    if ts is None:
        return None
    try:
        return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return None


def to_manifest(obj: store_mod.StoredObject) -> dict[str, Any]:
    """The API/CLI view of a stored object: the manifest plus server-set metadata and status."""
    return {
        "apiVersion": schema.API_VERSION,
        "kind": obj.kind,
        "metadata": {
            "name": obj.name,
            "labels": dict(obj.labels),
            **({"annotations": dict(obj.annotations)} if obj.annotations else {}),
            "generation": obj.generation,
            "resourceVersion": str(obj.resource_version),
            "creationTimestamp": rfc3339(obj.created_at),
        },
        "spec": dict(obj.spec),
        "status": dict(obj.status),
    }


def capture_retention(store: store_mod.Store) -> dict[str, capture.Covered | None]:
    """What each stored deployment that captures keeps now, by name: for how long (its
    ``spec.cascade.capture.retentionDays``), in which zones' stores (its ``zones``), and
    which capture of which deployment of that name it is (``store_mod.capture_since``); None
    for one whose spec no longer parses (its records keep the expiry they were captured
    with). A deployment missing here (capture off, or deleted) keeps no records."""
    out: dict[str, capture.Covered | None] = {}
    for obj in store.list("ModelDeployment"):
        try:
            cascade = parse_deployment(obj).cascade
        except ValueError:
            out[obj.name] = None
            continue
        if cascade is not None and cascade.capture is not None:
            c = cascade.capture
            out[obj.name] = capture.Covered(c.retentionDays * capture.DAY_S, frozenset(c.zones), store_mod.capture_since(obj))
    return out


def parse_site(obj: store_mod.StoredObject) -> schema.SiteSpec:
    return schema.SiteSpec.model_validate(obj.spec)


def parse_deployment(obj: store_mod.StoredObject) -> schema.ModelDeploymentSpec:
    return schema.ModelDeploymentSpec.model_validate(obj.spec)


def parse_model(obj: store_mod.StoredObject) -> schema.ModelSpec:
    return schema.ModelSpec.model_validate(obj.spec)


def register_agent_site(store: store_mod.Store, site: str, agent_id: str, location: agent_model.Location,
                        labels: Mapping[str, str]) -> None:
    """An agent joined a site nobody declared: record it as an edge Site from what it
    reports, or log why it cannot be scheduled. Create-only: the caller read "not declared"
    in an earlier transaction, and an operator's declaration applied since (another thread,
    another replica) stands; the agent's guess never replaces it."""
    actor = f"agent:{agent_id}"
    if not location.country or location.lat is None or location.lon is None:
        store.record(store_mod.Event(actor, "site-undeclared", "Site", site,
                                     "agent joined without --country/--lat/--lon and no Site declares it; it cannot be scheduled"))
        return
    doc = {"tier": "edge", "location": {"country": location.country, "lat": location.lat, "lon": location.lon,
                                        **({"region": location.region} if location.region else {})}}
    try:
        schema.SiteSpec.model_validate(doc)
        store.apply([store_mod.ObjectWrite("Site", site, dict(labels), doc, expected_version=0)],
                    store_mod.Event(actor, "register", "Site", site, "site registered by its agent on join"))
    except store_mod.Conflict:  # declared meanwhile: the declaration is the Site, and it is scheduled
        return
    except (ValueError, store_mod.StoreError) as exc:
        store.record(store_mod.Event(actor, "site-undeclared", "Site", site, f"cannot register: {exc}"))
