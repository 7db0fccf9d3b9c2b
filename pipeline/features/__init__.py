"""Frozen-encoder features: SAM image embeddings shared by the SAM stages, and the token caches and text
embeddings the trainable heads read."""
