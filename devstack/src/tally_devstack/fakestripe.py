"""Run ``localstripe`` with its state kept in the stack's own folder.

localstripe pickles its whole store to the hard-coded ``/tmp/localstripe.pickle`` on every
write, shared by every instance on the machine; here each stack keeps its own file
(``STRIPE_STATE``), so ``make run`` and a test run never see each other's customers.

    python -m tally_devstack.fakestripe --port 8420 [--from-scratch]
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from localstripe import resources, server


def main() -> None:
    state = Path(os.environ.get("STRIPE_STATE", "localstripe.pickle")).resolve()

    def load(self: resources.Store) -> None:
        if state.exists():
            with state.open("rb") as f:
                old = pickle.load(f)
            self.clear()
            self.update(old)

    def dump(self: resources.Store) -> None:
        tmp = state.with_suffix(".tmp")
        with tmp.open("wb") as f:
            pickle.dump(dict(self), f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(state)

    resources.Store.try_load_from_disk = load
    resources.Store.dump_to_disk = dump
    server.start()


if __name__ == "__main__":
    main()
