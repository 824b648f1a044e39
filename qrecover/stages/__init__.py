"""The stages every format shares: decompression, the inner-archive guard, tar."""
