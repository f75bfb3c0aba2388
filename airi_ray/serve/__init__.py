"""The HTTP ingress: an OpenAI-compatible API on Ray Serve."""
