"""fedtre coordinator: takes researchers' queries, fans them out to trust nodes, combines answers.

Not built yet: it arrives with the federation work (gRPC contract, fan-out, researcher client).
"""
