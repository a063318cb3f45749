"""The token of an ``Authorization`` header (shared by the control API and the gateways,
and with the agents' serving ports: :mod:`edgeplane_proto.token_scope` holds it)."""

from __future__ import annotations

from edgeplane_proto import token_scope

bearer_secret = token_scope.bearer_secret
