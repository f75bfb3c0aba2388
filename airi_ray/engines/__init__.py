"""vLLM engine wrappers: the one place that knows vLLM's API and engine arguments."""
