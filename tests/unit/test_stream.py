"""Token-indexed streams: every delta carries the index of its first token; the frontend drops duplicates,
refuses gaps, and follows a change of source (a continuation whose own indices start at 0)."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams
from pdserve.cluster.stream import StreamGap, TokenStream
from pdserve.protocol import TokenDelta


def d(index: int, *tokens: int, finished: bool = False) -> TokenDelta:
    return TokenDelta(request_id="r", new_token_ids=list(tokens), text="", index=index, finished=finished)


def test_in_order_deltas_pass_and_become_absolute():
    s = TokenStream()
    assert [s.accept(d(i, 10 + i)).index for i in range(3)] == [0, 1, 2]
    assert s.next_index == 3
    # a continuation elsewhere, recomputing the 3 sent tokens: its own indices restart at 0
    out = s.accept(d(0, 13), base=3)
    assert out.index == 3 and out.new_token_ids == [13] and s.next_index == 4
    assert s.accept(d(1, 14, finished=True), base=3).finished and s.finished


def test_duplicates_are_dropped_and_gaps_refused():
    s = TokenStream()
    s.accept(d(0, 1))
    s.accept(d(1, 2))
    assert s.accept(d(1, 2)) is None  # the same token again (a source that resent it)
    assert s.accept(d(0, 1)) is None
    with pytest.raises(StreamGap, match="expected token 2"):
        s.accept(d(3, 4))
    assert s.accept(d(2, 3)).index == 2  # the stream goes on from where the client is


def test_a_finish_without_tokens_passes():
    s = TokenStream()
    s.accept(d(0, 5))
    out = s.accept(d(1, finished=True))
    assert out is not None and out.finished and s.next_index == 1


def test_engine_deltas_are_indexed_from_zero_and_consecutive():
    llm = LLM(num_kv_blocks=64)
    eng = llm.engine
    eng.add_request("a", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    seen = []
    while eng.has_unfinished():
        seen += [(x.index, len(x.new_token_ids), x.finished) for x in eng.step() if x.request_id == "a"]
    assert [i for i, _, _ in seen] == list(range(6)) and seen[-1][2]
    # an exported request continues its indices on the importer
    eng.add_request("b", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for _ in range(3):
        eng.step()
    record, _ = eng.handoff.export_request("b")
    eng.handoff.release("b")
    n = len(record.output_token_ids)
    dst = LLM(num_kv_blocks=64).engine
    dst.handoff.import_request(record)
    dst.handoff.finish_import("b")  # no KV copied: only the indices are checked here
    first = next(x for x in dst.step() if x.request_id == "b")
    assert first.index == n
