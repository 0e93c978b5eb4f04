"""Model tooling behind the ``inhouse convert`` / ``quantize`` / ``install-service`` commands.
Heavy frameworks are imported lazily; a missing one raises ``MissingExtraError`` naming the
extra to install."""
