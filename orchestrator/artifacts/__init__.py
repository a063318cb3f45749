"""Model artifacts the control plane hands out: local files resolved, verified, served."""
