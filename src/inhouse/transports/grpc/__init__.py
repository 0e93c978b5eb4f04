"""The gRPC front end: the grpc.aio server, its interceptors, health checking."""
