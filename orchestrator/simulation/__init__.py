"""What-if simulation: the fleet under hypothetical failures, demand and carbon, planned purely.

``whatif.simulate(state, changes)`` asks the scheduler's planner what it would do if sites,
regions, countries or tiers were lost, demand were scaled, a site's grid or capacity
changed or sites were added, and reports it against today's placement. ``sweep.sweep``
ranks the sites (or regions) whose loss hurts most. Nothing here performs I/O: the
control plane and the CLI build the ``State`` and print the ``Report``.
"""
