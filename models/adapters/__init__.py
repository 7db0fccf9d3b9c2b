"""Role adapters over the foundation models (real weights or the tiny random-init builds of the same
architectures): captioner, CLIP, DINOv2, Grounding DINO, SAM."""
