"""KV transport implementations: `local` (in-process reference and test oracle) and `nixl` (NIXL over UCX)."""
