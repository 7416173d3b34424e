"""The disaggregation decider as a table: each rule with a case that flips if the rule is removed."""

import pytest

from pdserve.config import DisaggConfig
from pdserve.protocol import RouteRequest
from pdserve.router.policies import Candidate, WorkerView, decide_local_prefill

BUSY = 10_000  # prompt tokens queued on the least-queued prefill worker: saturated (default threshold 8192)


def decode(cached=0, free=1000, **kw) -> Candidate:
    return Candidate(WorkerView("d", "decode", num_blocks=1000, num_free_blocks=free, **kw), cached)


def prefill(queued: int) -> WorkerView:
    return WorkerView("p", "prefill", num_prefill_tokens_queued=queued)


def req(prompt: int) -> RouteRequest:
    return RouteRequest(request_id="r", num_prompt_tokens=prompt, max_tokens=10)


CASES = [
    # (decode candidate, prefill queue, prompt tokens, expected)
    # decode_has_prefix: the decode worker lacks at most 64 tokens
    (decode(cached=936), 0, 1000, (True, "decode_has_prefix")),
    (decode(cached=935), 0, 1000, (False, "disaggregated")),
    # ...whatever is queued there: a 64-token tail is a step's worth of noise
    (decode(cached=990, num_prefill_tokens_queued=5000), 0, 1000, (True, "decode_has_prefix")),
    # prefill_saturated: the prefill pool's shortest queue is long, the decode worker has KV room...
    (decode(), BUSY, 1000, (True, "prefill_saturated")),
    (decode(), 8191, 1000, (False, "disaggregated")),  # not saturated
    (decode(free=100), BUSY, 1000, (False, "disaggregated")),  # no room
    # ...and its queued prefill tokens, this prompt's uncached suffix included, fit one step's budget (1024)
    (decode(), BUSY, 1024, (True, "prefill_saturated")),
    (decode(), BUSY, 1025, (False, "disaggregated")),
    (decode(), BUSY, 40_000, (False, "disaggregated")),  # a long prompt would stall every decode for seconds
    (decode(cached=39_500), BUSY, 40_000, (True, "prefill_saturated")),  # only the uncached suffix counts
    (decode(num_prefill_tokens_queued=100), BUSY, 1000, (False, "disaggregated")),  # reported queue
    (decode(pending_tokens=100), BUSY, 1000, (False, "disaggregated")),  # routed there since the last report
    (decode(num_prefill_tokens_queued=24), BUSY, 1000, (True, "prefill_saturated")),
]


@pytest.mark.parametrize("candidate,prefill_queued,prompt,expected", CASES)
def test_decider_table(candidate, prefill_queued, prompt, expected):
    assert decide_local_prefill(candidate, prefill(prefill_queued), req(prompt), DisaggConfig()) == expected


@pytest.mark.parametrize("candidate", [decode(), decode(free=0, num_prefill_tokens_queued=50_000)])
def test_without_prefill_workers_the_decode_worker_prefills(candidate):
    assert decide_local_prefill(candidate, None, req(40_000), DisaggConfig()) == (True, "no_prefill_worker")


@pytest.mark.parametrize(
    "options,prompt,expected",
    [
        ({"local_prefill_step_tokens": 0}, 1000, (False, "disaggregated")),  # saturation never moves a prompt
        ({"local_prefill_step_tokens": 10**9}, 40_000, (True, "prefill_saturated")),  # the old rule: any length
        ({"local_prefill_max_tokens": -1}, 1, (True, "prefill_saturated")),  # no tail rule: a 1-token prompt fits
        ({"prefill_saturated_tokens": 20_000}, 1000, (False, "disaggregated")),
    ],
)
def test_decider_knobs(options, prompt, expected):
    assert decide_local_prefill(decode(), prefill(BUSY), req(prompt), DisaggConfig(**options)) == expected


def test_step_budget_default_and_bounds():
    assert DisaggConfig().local_prefill_step_tokens == 1024
    with pytest.raises(ValueError):
        DisaggConfig(local_prefill_step_tokens=-1)
