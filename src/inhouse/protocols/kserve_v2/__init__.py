"""KServe Open Inference Protocol v2: REST and gRPC wire formats and their routes."""
