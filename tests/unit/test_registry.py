"""The controller's registry: pool targets follow the config tree's rules, and a refused change leaves them
as they were; states move one way, to dead."""

from __future__ import annotations

import pytest

from pdserve.controller.registry import Registry, WorkerRecord


def test_targets_are_checked_by_the_config_rules_and_a_refusal_changes_nothing():
    reg = Registry({"prefill": 1, "decode": 1})
    reg.set_targets(prefill=2, decode=3)
    assert reg.targets == {"prefill": 2, "decode": 3, "colocated": 0}
    for bad, key in (({"decode": 0}, "pools"), ({"prefill": -1}, "prefill"), ({"colocated": "x"}, "colocated")):
        version = reg.version
        with pytest.raises(ValueError, match=key):
            reg.set_targets(**bad)
        assert reg.targets == {"prefill": 2, "decode": 3, "colocated": 0} and reg.version == version
    reg.set_targets(prefill=0, decode=0, colocated=2)
    assert reg.missing() == {"prefill": 0, "decode": 0, "colocated": 2}


def test_states_and_membership():
    reg = Registry({"decode": 1})
    reg.add(WorkerRecord("decode-1", "decode"))
    assert reg.missing()["decode"] == 0 and reg.membership()[0][:3] == ("decode-1", "decode", "starting")
    assert reg.set_state("decode-1", "ready") and reg.ready_roles() == {"decode"}
    assert reg.set_state("decode-1", "dead") and reg.set_state("decode-1", "ready") is None  # dead is final
    assert reg.membership() == [] and reg.missing()["decode"] == 1
    with pytest.raises(ValueError, match="state"):
        reg.set_state("decode-1", "zombie")
