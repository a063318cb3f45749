"""The distillation loop: capture a cascade's traffic, train a new edge model, verify, publish."""
