"""fedtre node: runs inside one trust's firewall and answers approved aggregate queries."""
