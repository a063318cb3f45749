"""edgeplane control plane: manifests, state, scheduler, reconciler, adapters, gateway.

Package map (each folder is one idea):

- ``manifests``  user documents (Site, Model, ModelDeployment), strict validation
- ``store``      the embedded SQLite state store and its event log
- ``scheduler``  the pure placement planner (no I/O)
- ``reconciler`` the loop that turns plans into actions and retries them
- ``adapters``   the only code that calls outside systems (Ray Serve, Kubernetes)
- ``agents``     the gRPC service edge agents join and report to
- ``gateway``    the Open Inference Protocol front door and endpoint routing
- ``api``        the HTTP control API; ``cli`` the ``edgeplane`` command
- ``testing``    a harness that starts a control plane and agents (tests, bench, demo)
"""

__version__ = "0.1.0"
