"""The one place where domain values and wire messages (``fedtre.v2``) meet: one module per
``.proto`` file, each with symmetric ``x_to_proto`` / ``x_from_proto`` pairs."""
