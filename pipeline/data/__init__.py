"""Text sources, tokenisation into fixed-length blocks, and the hidden-state shard format."""
