"""Data: the chat format every stage shares, dataset loaders, and the toy-world generator."""
