"""Governance: signed project applications, committee decisions, trust participation, and the
checks every node makes on them (``docs/GOVERNANCE.md``)."""
