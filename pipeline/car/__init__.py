"""CaR (car-paper §3): the training-free recurrent CLIP segmenter."""
