"""pseudoseg: tasks layer."""
