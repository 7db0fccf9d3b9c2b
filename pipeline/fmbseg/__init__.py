"""FMbSeg Stage 1 (fmbseg-paper §3.2): category detection, Stage 1.1 query-point masks, Stage 1.2 automatic-mask
labels, merged pseudo-label maps."""
