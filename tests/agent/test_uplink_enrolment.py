"""What an uplink that must enrol over the join port costs while that port cannot be reached:
an agent whose client certificate expired during an outage (or one never enrolled) tries
again every 30 s, maybe for days, and each attempt must not make a new private key in a
child process. A real uplink, real key material (a CA of the control plane's own kind, the
agent's identity tool), dialling a loopback port where nothing listens; its waits and
clocks are injected, so the attempts come at once."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib

import pytest

from edge_agent import state, tls, uplink
from edgeplane_proto import identity
from orchestrator.security import ca

from .conftest import TOKEN
from .test_join_admission import Reporter, _ignore, _Top
from .test_uplink_outage_log import Clocks, free_port

ATTEMPTS = 4
DAY = 86400.0


@dataclasses.dataclass(frozen=True)
class CountedTls(tls.AgentTls):
    """The agent's TLS material, counting the keys its identity tool makes."""

    keys: list[bytes] = dataclasses.field(default_factory=list)

    async def new_request(self, site: str) -> tuple[bytes, bytes]:
        made = await super().new_request(site)
        self.keys.append(made[0])
        return made


def enrol_before(tmp_path: pathlib.Path, agent_tls: tls.AgentTls) -> float:
    """Give the agent a certificate as an earlier enrolment did; returns when it expires."""
    authority = ca.CertificateAuthority.load_or_create(tmp_path / "ca")
    key_pem, csr_pem = identity.new_key_and_csr("edge-a")
    certificate = authority.issue_agent("edge-a", csr_pem)
    agent_tls.save(key_pem, certificate, authority.certificate_pem)
    return identity.validity(certificate)[1]


@pytest.mark.parametrize("case", ["certificate expired offline", "never enrolled"])
async def test_enrolment_attempts_that_fail_reuse_one_key(tmp_path: pathlib.Path, case: str) -> None:
    port = free_port()  # nothing listens, neither the agent port nor the join port
    agent_tls = CountedTls(tmp_path / "agent", join_target=f"127.0.0.1:{free_port()}")
    clocks = Clocks()
    if case == "certificate expired offline":
        clocks.now = enrol_before(tmp_path, agent_tls) + DAY  # the uplink was down past its end
    rests = 0
    up: uplink.Uplink

    async def sleep(seconds: float) -> None:
        nonlocal rests
        rests += 1
        if rests == ATTEMPTS:
            await up.stop()
        await clocks.sleep(seconds)

    facts = uplink.JoinFacts(site="edge-a", bootstrap_token=TOKEN, endpoint_url="http://127.0.0.1:9", agent_version="test",
                             heartbeat_interval=None)
    up = uplink.Uplink(f"127.0.0.1:{port}", facts, state.StateStore(tmp_path / "agent"), Reporter(), _ignore,
                       agent_tls=agent_tls, rng=_Top(), clock=clocks.wall, monotonic=clocks.monotonic, sleep=sleep)
    await asyncio.wait_for(up.run(), 120)
    assert rests == ATTEMPTS  # each attempt failed at the join port
    assert len(agent_tls.keys) == 1  # one key and CSR, sent again by each attempt
