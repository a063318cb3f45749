"""What an agent's join may carry, checked before the hub takes it.

An agent's site name, endpoint URL, labels and location become the fleet's state: a Site
registered from them (``ControlPlane._register_site``), a certificate naming the site,
the URL the gateway forwards to. So each is held to what the rest of the control plane
accepts from a manifest or can use, and a join that breaks a rule is refused
(INVALID_ARGUMENT) with the rule, not taken and failed on later.
"""

from __future__ import annotations

import re

from edgeplane_proto import endpoint_url, lookalike, site_name
from orchestrator.agents import errors, model
from orchestrator.manifests import schema

MAX_LABELS = 64
MAX_LABEL_KEY_CHARS = 253  # a manifest's label limits (schema.LabelKey, schema.LabelValue)
MAX_LABEL_VALUE_CHARS = 63
MAX_VERSION_CHARS = 64
_LABEL_KEY = re.compile(schema.LABEL_KEY_PATTERN)
_LABEL_VALUE = re.compile(schema.LABEL_VALUE_PATTERN)


def check(application: model.JoinApplication) -> None:
    """Raise :class:`InvalidJoin` naming the first thing ``application`` may not carry."""
    refused = site_name.refusal(application.site)
    if refused is not None:
        raise errors.InvalidJoin(f"site name {refused}")
    refused = endpoint_url.refusal(application.endpoint_url)
    if refused is not None:
        raise errors.InvalidJoin(f"endpoint_url: {refused}")
    if len(application.agent_version) > MAX_VERSION_CHARS:
        raise errors.InvalidJoin(f"agent_version is {len(application.agent_version)} characters; at most {MAX_VERSION_CHARS}")
    if len(application.labels) > MAX_LABELS:
        raise errors.InvalidJoin(f"at most {MAX_LABELS} labels are allowed")
    for key, value in application.labels.items():
        if not _LABEL_KEY.fullmatch(key) or len(key) > MAX_LABEL_KEY_CHARS:
            raise errors.InvalidJoin(f"label key {key!r} is not one a manifest may hold: letters, digits and '-_./', "
                                     f"starting and ending with a letter or digit, at most {MAX_LABEL_KEY_CHARS} characters"
                                     f"{lookalike.explain(key)}")
        if not _LABEL_VALUE.fullmatch(value) or len(value) > MAX_LABEL_VALUE_CHARS:
            raise errors.InvalidJoin(f"label {key}={value!r}: a value is empty or letters, digits and '-_.', starting and "
                                     f"ending with a letter or digit, at most {MAX_LABEL_VALUE_CHARS} characters"
                                     f"{lookalike.explain(value)}")
    loc = application.location
    if loc.lat is not None and not (-90 <= loc.lat <= 90 and -180 <= (loc.lon or 0) <= 180):
        raise errors.InvalidJoin(f"location {loc.lat},{loc.lon} is not a valid lat,lon")
    if loc.country:
        try:
            schema.check_country(loc.country)  # the list a Site manifest's country is checked against
        except ValueError as exc:
            raise errors.InvalidJoin(f"country: {exc}") from None
