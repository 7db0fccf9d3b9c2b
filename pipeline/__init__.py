"""pseudoseg: pipeline layer."""
