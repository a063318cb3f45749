"""Security mechanisms of the control plane that are not one component's business:
the agent certificate authority, gateway admission (auth and per-client rate limits)."""
