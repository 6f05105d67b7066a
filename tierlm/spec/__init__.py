"""Speculative decoding: proposers of draft tokens (verified by the model runner)."""
