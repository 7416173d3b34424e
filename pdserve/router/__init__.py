"""The global router: prefix index, routing policies (pure: filter -> score -> pick) and the router (no Ray)."""
