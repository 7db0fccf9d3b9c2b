"""The trainable heads (USE segment-embedding head, FMbSeg alignment block), their losses, datasets and the
training loop."""
