"""The queen's HTTP front door: an OpenAI-compatible API for the whole
cluster, served beside its gRPC port in the same process (docs/openai-api.md)."""
