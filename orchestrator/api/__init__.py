"""The HTTP control API (``/v1``, ``/healthz``, ``/metrics``) served by ``edgeplane serve``."""
