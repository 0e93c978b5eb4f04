"""inhouse: a self-hosted inference server for private AI deployments."""

__version__ = "0.1.0"
