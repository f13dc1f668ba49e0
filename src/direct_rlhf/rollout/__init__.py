"""Generation backends: Hugging Face `generate` (KV cache, early stop at end-of-turn); vLLM on GPUs."""
