"""Global scheduler: routing policies (pure) and the GlobalScheduler actor (control plane only)."""
