"""Generated ``inference.GRPCInferenceService`` (``inference_pb2``, ``inference_pb2_grpc``).

The modules are produced by ``setup.py`` (or ``make proto``) from
``protos/edgeplane_proto/inference/v2/inference.proto``; they are not committed.
"""
