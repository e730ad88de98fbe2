"""The coordinator's state directory on a real filesystem that fills up: it answers nothing
(no trust is asked, nothing is spent), reports NOT_SERVING, and serves again once the disk has
room, saying so in its audit log (``audit.resumed``), which still verifies."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from fedtre.audit.log import read_audit
from fedtre.audit.verify import verify
from fedtre.client import CoordinatorUnavailable
from tests.integration.federation import PROJECT, Federation, make_databases, make_pki
from tests.integration.full_disk import fill, settle, small_filesystem

BY_SEX = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"


def _until(check, what: str, seconds: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.slow
def test_a_full_disk_at_the_coordinator_releases_nothing_spends_nothing_and_recovers(
    tmp_path: Path, catalog
) -> None:  # type: ignore[no-untyped-def]
    pki = make_pki(tmp_path / "pki")
    fed = Federation(tmp_path / "fed", pki, make_databases(tmp_path / "trusts", catalog))
    fed.start()
    try:
        hub = fed.coordinator
        state = hub.home / "state"
        fed.kill(hub.name)
        saved = tmp_path / "saved-state"
        shutil.copytree(state, saved)
        with small_filesystem(state, size_kib=4096):
            for item in saved.iterdir():
                shutil.copy2(item, state / item.name)
            fed.restart_coordinator()
            _until(fed.coordinator_serving, "the coordinator did not start serving")
            with fed.client() as client:
                assert client.query(PROJECT, BY_SEX, 0.1).columns
            spent = {n: fed.spent_units(n) for n in fed.nodes}
            settle(fed.audit_path(hub.name))
            filler = fill(state)  # the disk fills up
            with fed.client(retries=0) as client, pytest.raises(CoordinatorUnavailable) as down:
                client.query(PROJECT, BY_SEX, 0.1)
            # told apart from "down": it is up, and says why it answers nothing (no paths)
            assert "cannot write its audit log" in str(down.value)
            # and how to ask again without spending twice: this query's own id
            assert down.value.query_id and down.value.query_id in str(down.value)
            assert "could not be reached" not in str(down.value) and "/" not in str(down.value)
            assert {n: fed.spent_units(n) for n in fed.nodes} == spent  # no trust spent
            _until(lambda: not fed.coordinator_serving(), "SERVING while it cannot write its log")
            filler.unlink()  # space returns
            _until(fed.coordinator_serving, "the coordinator did not resume")
            with fed.client() as client:
                assert client.query(PROJECT, BY_SEX, 0.1).columns
            codes = fed.stop()
            assert codes[hub.name] == 0
            log = fed.audit_path(hub.name)
            assert "audit.resumed" in [e["event"] for e in read_audit(log)]
            assert verify(log).ok
    finally:
        fed.stop()
