"""Edge agents as seen from the control plane.

``model``    typed values (AgentStatus, Assignment, AgentEvent...) with proto conversions
``hub``      AgentHub: live inventory, health by missed heartbeats, assignment channels
``auth``     JoinAuthenticator protocol and an in-memory implementation
``identity`` proving an agent's identity for a join or stream, off the event loop
``service``  the grpc.aio servicer and ``start_agent_server``
``admission`` how many joins are worked on at once, and when one refused comes back
``errors``   the hub's error tree
"""
