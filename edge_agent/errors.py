"""The agent's own errors; outside libraries' exceptions are translated at each boundary.

    AgentError
    ├── ArtifactError            fetching or verifying an artifact failed
    │   ├── ArtifactUnavailable  network / HTTP status / refused URL scheme
    │   └── ArtifactIntegrityError  sha256 mismatch or size limit: never loaded
    ├── ModelLoadError           onnxruntime refused the model
    ├── InvalidInput             an infer request does not fit the model (-> HTTP 400)
    ├── Overloaded               as many runs wait for a worker as the agent queues (-> HTTP 503),
    │                            or sequences for a generative model's slot (-> HTTP 429)
    ├── ControlPlaneError        the uplink failed
    │   ├── AgentUnavailable     control plane unreachable: back off and retry
    │   ├── ControlPlaneBusy     joins refused for now: retry when it says
    │   ├── JoinRefused          token/credential refused, site taken, bad request
    │   ├── NotJoined            the control plane forgot us: join again
    │   └── RenewalDue           the client certificate is due: join again with a CSR
    ├── StateError               the state file is unreadable
    │   └── CertificateUnusable  the client key or certificate is damaged, or not a pair
    └── NewerState               a newer agent wrote the data dir: refused, never set aside (exit code 2)
"""

from __future__ import annotations

from edgeplane_proto.headers import MAX_RETRY_AFTER_S


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ArtifactError(AgentError):
    pass


class ArtifactUnavailable(ArtifactError):
    def __init__(self, message: str, received: int = 0) -> None:
        super().__init__(message)
        self.received = received  # bytes this attempt added to the partial download, kept for the next one
        self.slow = False  # ended as too slow (--download-speed-limit): its turn goes to the next download


class ArtifactIntegrityError(ArtifactError):
    pass


class ModelLoadError(AgentError):
    pass


class InvalidInput(AgentError):
    pass


class Overloaded(AgentError):
    def __init__(self, message: str, retry_after: int) -> None:  # retry_after: seconds, at least 1
        super().__init__(message)
        self.retry_after = min(retry_after, MAX_RETRY_AFTER_S)  # a longer wait would be ignored


class ControlPlaneError(AgentError):
    pass


class AgentUnavailable(ControlPlaneError):
    pass


class ControlPlaneBusy(ControlPlaneError):
    def __init__(self, message: str, retry_after_s: float) -> None:  # retry_after_s: what the control plane asked
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RenewalDue(ControlPlaneError):
    pass


class JoinRefused(ControlPlaneError):
    def __init__(self, message: str, code: str = "") -> None:  # code: the gRPC status's name, when one said it
        super().__init__(message)
        self.code = code


class NotJoined(ControlPlaneError):
    pass


class StateError(AgentError):
    pass


class CertificateUnusable(StateError):
    pass


class NewerState(AgentError):
    """Not a :class:`StateError`: a file that error sets aside is damaged, while this one is
    whole and a newer agent's (its identity, which setting aside would lose for good)."""
