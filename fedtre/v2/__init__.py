"""Generated wire contract, v2."""
