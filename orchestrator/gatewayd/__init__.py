"""The standalone gateway (``edgeplane gateway``): routing without the control plane's store."""
