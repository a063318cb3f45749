"""One local Ray cluster for a whole test session, benchmark or demo run.

Starting Ray costs seconds and most of a gigabyte, so the test suite shares a single head
(see ``tests/conftest.py``) and every user of it goes through this module. The cluster is
edgeplane's own :class:`~orchestrator.adapters.local_ray.LocalRayCluster`, sized for small
replicas (fractions of a CPU) so a 2-core machine can run several applications at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from orchestrator.adapters import local_ray

#: Logical CPUs the test cluster advertises: replicas ask for 0.1-0.25 CPU each and are
#: mostly idle, so advertising more than the machine has lets several apps coexist.
TEST_CPUS = 8


@contextlib.contextmanager
def shared_ray_cluster(
    *, num_cpus: int = TEST_CPUS, num_gpus: int = 0
) -> Iterator[local_ray.LocalRayEndpoints]:
    """Start a private local Ray head, yield its endpoints, stop it (and only it) after.

    ``EDGEPLANE_TEST_RAY_CPUS`` overrides ``num_cpus``.
    """
    cpus = int(os.environ.get("EDGEPLANE_TEST_RAY_CPUS", num_cpus))
    cluster = local_ray.LocalRayCluster(num_cpus=cpus, num_gpus=num_gpus)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
