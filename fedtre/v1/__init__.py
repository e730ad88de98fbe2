"""Generated wire contract, version 1."""
