"""GPT-2 text generation engine: continuous batching over a static KV cache."""
