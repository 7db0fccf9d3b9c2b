"""The reports: the command line, the end-of-run table and run.json, status and cleanup, the dataset card."""
