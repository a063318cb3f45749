"""Wire contracts shared by the control plane and the edge agent.

Both sides speak these and nothing else to each other: the versioned gRPC protocol
(``edgeplane_proto.agent.v1``, generated at build time from ``protos/``) and the Open
Inference Protocol tensor codec (:mod:`edgeplane_proto.oip`). The package depends on no
other edgeplane package, so the agent never needs the orchestrator to talk to it.
"""
