"""A client that leaves while its KV handoff is on the way (the frontend aborts on the prefill and the decode
worker at once): no transfer may touch blocks nobody holds. The decode worker's abort waits for the pull
(from before the reservation: an abort that slipped in between freed the blocks the pull then wrote into,
which another request could hold by then), and the prefill worker keeps the blocks the decode worker may be
reading until it confirms. The soak found this: 5 of 40,355 answers wrong from their first decoded token.
Two in-process workers over the local transport; the pull checks, as it starts, who holds its blocks."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.config import EngineConfig, WorkerConfig
from pdserve.protocol import EngineRequest
from pdserve.workers.worker import Worker
from tests.unit.test_migration import CONSUMER, GREEDY, Handle, collect, leak_free, prompt, reference


def make(name: str, role: str) -> tuple[Worker, Handle]:
    w = Worker(name, role, EngineConfig(num_kv_blocks=64, max_num_batched_tokens=256), WorkerConfig(), "local")
    return w, Handle(w)


async def refs(w: Worker, block_ids: list[int]) -> list[int]:
    return await w.engine_thread.call(lambda e: [e.blocks.blocks[b].ref_cnt for b in block_ids])


@pytest.mark.parametrize("leave", ["before_the_pull", "during_the_pull", "not_at_all"])
def test_a_client_leaving_during_the_handoff_frees_nothing_a_transfer_uses(leave):
    async def main():
        (p, hp), (d, hd) = make("p0", "prefill"), make("d0", "decode")
        p.add_peers([d.peer_info()])
        d.add_peers([p.peer_info()])
        seen, real_pull, pulling = [], d.transport.pull, asyncio.Event()

        async def checked_pull(peer, src, dst, timeout_s, key=0):
            pulling.set()
            await asyncio.sleep(0.05)  # the aborts are handled meanwhile
            seen.append((await refs(p, src), await refs(d, dst)))
            await real_pull(peer, src, dst, timeout_s=timeout_s, key=key)

        d.transport.pull = checked_pull
        ids = prompt(100)
        req = EngineRequest(request_id="a", prompt_token_ids=ids, params=GREEDY, reply_to=CONSUMER)
        try:
            result = await p.prefill(req, d.worker_id, hd)
            decode = asyncio.ensure_future(d.decode(result.handoff, hp, CONSUMER))
            if leave == "not_at_all":
                await decode
                rest = [t for delta in await collect([d], "a") for t in delta.new_token_ids]
                assert result.delta.new_token_ids + rest == await reference(GREEDY, ids)
            else:  # the frontend's aborts, sent after the decode call (as Ray orders one caller's calls)
                if leave == "during_the_pull":
                    await pulling.wait()
                await asyncio.gather(d.abort(["a"]), p.abort(["a"]))
                with pytest.raises(asyncio.CancelledError):
                    await decode
            assert seen or leave == "before_the_pull"  # aborted before it: nothing is pulled at all
            for src_refs, dst_refs in seen:
                assert min(src_refs) > 0, f"the prefill worker freed blocks the pull was reading: {src_refs}"
                assert min(dst_refs) > 0, f"the decode worker freed blocks the pull was writing: {dst_refs}"
            await leak_free(p, d)
        finally:
            await p.shutdown()
            await d.shutdown()

    asyncio.run(main())
