"""Embeddings: encoder models (BERT via sentence-transformers' configs), pooling, and the
engine that batches embedding requests."""
