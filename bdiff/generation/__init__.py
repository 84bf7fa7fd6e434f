"""Generation: the block-by-block sampler with its exact KV cache, and judges of what it writes."""
