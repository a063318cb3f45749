"""Adapters: the only code that calls systems outside edgeplane.

Each module wraps one outside system and translates its errors into edgeplane's own:
:mod:`.ray_serve` (Serve REST API of a Ray cluster), :mod:`.local_ray` (a Ray head that
edgeplane starts itself), :mod:`.kuberay` (KubeRay ``RayService`` objects through the
Kubernetes API). :mod:`.serve_config` holds what they share and is free of I/O. Import the
submodules directly; this package imports nothing so that loading one adapter never pulls
in another's client library.
"""
