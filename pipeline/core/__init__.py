"""Shared by every branch: sources and ingest, image decoding, coordinate transforms, masks and RLE, atomic shard
artifacts and locks, the host/accelerator overlap helpers, vocabularies and the embedded sample set."""
