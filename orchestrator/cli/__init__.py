"""The ``edgeplane`` command."""
