"""The engine: units and commits, shard ranges, locks, progress, settings — no stage, no report."""
