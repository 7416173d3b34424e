"""The controller: one detached Ray actor that owns a deployment (registry, router, lifecycle, frontends)."""
