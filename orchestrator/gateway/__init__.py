"""The apps' front door: Open Inference Protocol routing to the nearest allowed replica."""
