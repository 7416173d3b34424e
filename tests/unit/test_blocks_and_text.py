"""Block hashing, the block pool and its KV events, and incremental detokenization."""

import subprocess
import sys

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.hashing import block_hashes, root_hash
from pdserve.protocol import BlockRemoved, BlockStored


def test_block_hashes_are_chained_salted_and_identical_across_processes():
    tokens = list(range(40))
    root = root_hash("model-a")
    hashes = block_hashes(tokens, 16, root)
    assert len(hashes) == 2  # only full blocks
    assert all(isinstance(h, bytes) and len(h) == 16 for h in [root, *hashes])  # 128-bit
    assert block_hashes(tokens, 16, root_hash("model-a", "tenant")) != hashes  # a cache salt is a new root
    assert root_hash("model-a", "b") != root_hash("model-ab") != root_hash("model-a", "")
    assert block_hashes(tokens, 16, root_hash("model-b")) != hashes
    assert block_hashes([99] + tokens[1:], 16, root)[1] != hashes[1]  # a change upstream changes every child
    assert block_hashes(tokens, 16, root, start=hashes[:1]) == hashes
    code = (
        "from pdserve.hashing import block_hashes, root_hash; "
        "print(block_hashes(list(range(40)), 16, root_hash('model-a')))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert other.stdout.strip() == str(hashes)


def test_block_pool_refcounts_lru_eviction_and_events():
    bm = BlockManager(num_blocks=4, block_size=2, record_events=True)
    root, tokens, h11, h12, h13 = b"root", [1, 2, 3, 4, 5, 6], b"h11", b"h12", b"h13"
    a = bm.allocate(2)
    bm.cache_blocks(a, [h11, h12], tokens, 0, 2, root)
    assert bm.take_events() == [BlockStored(block_hashes=[h11, h12], parent_hash=root)]
    assert bm.cached_prefix([h11, h12, h13], tokens, root) == a
    bm.touch(a)  # a second reader
    bm.free(a)
    assert bm.num_free_blocks == 2
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.cached_prefix([h11, h12], tokens, root) == a  # freed but still cached
    b = bm.allocate(2)  # the two never-cached blocks go first
    assert set(b).isdisjoint(a) and bm.cached_prefix([h11], tokens, root) == a[:1]
    c = bm.allocate(1)  # now evicts: the tail of the cached sequence (hash h12) goes before its head
    assert c == [a[1]] and bm.take_events() == [BlockRemoved(block_hashes=[h12])]
    assert bm.cached_prefix([h11, h12], tokens, root) == [a[0]]
    # a hit needs the same tokens and root, not just the hash
    assert bm.cached_prefix([h11], [1, 9], root) == [] and bm.cached_prefix([h11], tokens, b"other") == []
    bm.free(b + c)
    bm.check_no_leak()


def test_detokenizer_never_emits_partial_utf8():
    from pdserve.demo_model import demo_tokenizer

    tok = demo_tokenizer()  # byte-level: multi-byte characters span several tokens
    text = "héllo wörld, 世界 🙂!"
    ids = tok.encode(text)
    assert len(ids) > len(text)
    detok = IncrementalDetokenizer(tok, [1, 2, 3], skip_special_tokens=True, stop=[])
    pieces = []
    for t in ids:
        detok.add(t)
        piece = detok.take(False)
        assert "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) + detok.take(True) == text
    assert any(p == "" for p in pieces)  # held back mid-character


def test_detokenizer_holds_back_a_possible_stop_string():
    from pdserve.demo_model import demo_tokenizer

    tok = demo_tokenizer()
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True, stop=["END"])
    released = ""
    for t in tok.encode("abcEN"):
        detok.add(t)
        released += detok.take(False)
    assert released == "abc"  # "EN" could still become "END"
    for t in tok.encode("Dxyz"):
        detok.add(t)
    assert detok.stopped and detok.take(True) == "" and detok.text == "abc"
