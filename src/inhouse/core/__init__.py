"""The transport-free core: model specs, repository, manager, data plane."""
