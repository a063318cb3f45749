"""Code that runs inside Ray Serve replicas on data-centre sites.

Imported by Ray workers through the import path the data-centre actuator puts in the Serve
config, so it depends on Ray Serve, onnxruntime and the wire codec only - never on the rest
of the control plane.
"""
