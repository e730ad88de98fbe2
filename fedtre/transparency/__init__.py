"""The public transparency register: what projects use patient data, approved by whom, and
what they have spent, built from approvals and audit logs."""
