"""The ``tally`` command: mint development tokens, send usage, read wallets and the ledger,
list and replay dead letters, test webhook endpoints, apply migrations. HTTP goes through the
Python client (``tally_client``); every command takes ``--json`` for scripts.

Exit codes: 0 done; 1 refused (an API error, a rejected usage event, a failed check);
2 bad usage of the command; 3 Tally or a dependency unreachable (or a 5xx)."""

OK, REFUSED, USAGE, UNAVAILABLE = 0, 1, 2, 3
