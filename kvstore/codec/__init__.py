"""Lossless codecs over quantized KV, and the versioned container every stored object uses."""
