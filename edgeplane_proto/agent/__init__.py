"""Agent <-> control-plane protocol, one sub-package per version."""
