"""Usage accounting: a persistent ledger of what was embedded, paid and avoided, and reports.

See :mod:`adapted_embeddings.usage.ledger` (the ledger), :mod:`.prices` (prices as data)
and :mod:`.report` (the figures ``usage_report()``, ``adapted-embeddings report`` and the
server's dashboard show).
"""
