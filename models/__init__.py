"""pseudoseg: models layer."""
