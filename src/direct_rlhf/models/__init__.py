"""Models: loading (local folder or hub id), the tokenizer we train for the toy world, tiny-model factory."""
