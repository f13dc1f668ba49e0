"""Generation: Hugging Face `generate` with the KV cache and an early stop at the end of the turn."""
