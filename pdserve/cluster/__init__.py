"""A frontend's side of the cluster: `ClusterClient` (membership, routing calls, token streams) and the
frontend actor serving the OpenAI app over it."""
