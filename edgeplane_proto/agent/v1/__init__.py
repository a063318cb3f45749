"""Generated ``edgeplane.agent.v1`` protocol (``agent_pb2``, ``agent_pb2_grpc``).

The modules are produced by ``setup.py`` (or ``make proto``) from
``protos/edgeplane_proto/agent/v1/agent.proto``; they are not committed.
"""
