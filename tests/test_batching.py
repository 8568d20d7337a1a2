"""lorakit.batching: packed rows, packed and unpacked losses alike, a deterministic stream that
resumes exactly, rank shards and length buckets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import make_tokenizer, tiny_llama

from lorakit.batching import BatchStream
from lorakit.config import DataConfig
from lorakit.data import TokenizedDataset, tokenize_records
from lorakit.errors import UserError


def small_dataset(n: int = 13) -> TokenizedDataset:
    words = "the quick brown fox jumps over lazy dog two plus four".split()
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
        records.append({"prompt": f"Q{i}: {text}?", "completion": " " + " ".join(rng.choice(words, size=3))})
    return tokenize_records(list(enumerate(records, start=1)), make_tokenizer("llama3"), DataConfig(max_length=64), source="d.jsonl")


def rows_of(batch: dict, pad_id: int = 0) -> list[tuple]:
    """Each row as (ids, labels, positions) with the padding cut off."""
    out = []
    for ids, labels, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
        n = int((ids != pad_id).sum())
        out.append((tuple(ids[:n].tolist()), tuple(labels[:n].tolist()), tuple(pos[:n].tolist())))
    return out


def test_packed_rows_restart_positions_and_mask_boundaries():
    ds = small_dataset()
    stream = BatchStream(ds, batch_size=2, max_length=64, packing=True, seed=0, pad_id=0)
    seen, trainable = [], 0
    for batch in stream.epoch_batches():
        ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
        assert ids.dtype == labels.dtype == pos.dtype == torch.int64 and ids.shape == labels.shape == pos.shape
        assert batch["num_trainable"] == int((labels[:, 1:] != -100).sum())
        assert batch["num_tokens"] == int((ids != 0).sum())
        trainable += batch["num_trainable"]
        for row_ids, row_labels, row_pos in zip(ids.tolist(), labels.tolist(), pos.tolist()):
            starts = [t for t, p in enumerate(row_pos) if p == 0]
            n = sum(1 for t in row_ids if t != 0)
            for a, b in zip(starts, starts[1:] + [len(row_ids)]):
                assert row_pos[a:b] == list(range(b - a))  # positions restart per segment
                assert row_labels[a] == -100  # never predicted from the previous example
                if a >= n:  # padding: its own segment, no loss
                    assert set(row_ids[a:b]) == {0} and set(row_labels[a:b]) == {-100}
                else:
                    seen.append(row_ids[a:b])
    assert sorted(seen) == sorted(ds.example(i)[0].tolist() for i in range(len(ds)))
    assert trainable == ds.stats.trainable_tokens
    assert stream.num_rows < len(ds) and stream.packing_efficiency() > 0.5


def shifted_loss_sum(model, batch: dict, positions: torch.Tensor | None = None) -> torch.Tensor:
    logits = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"] if positions is None else positions,
        attention_mask=None,
        use_cache=False,
    ).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def step(model, batches: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss of one optimizer step over micro-batches, normalised by the step's trainable tokens."""
    model.zero_grad()
    total = sum(b["num_trainable"] for b in batches)
    loss = 0.0
    for b in batches:
        part = shifted_loss_sum(model, b) / total
        part.backward()
        loss += part.item()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_and_unpacked_batches_give_same_loss_and_gradients():
    ds = small_dataset()
    model = tiny_llama().float()
    packed = list(BatchStream(ds, batch_size=2, max_length=64, packing=True, seed=0).epoch_batches())
    unpacked = list(BatchStream(ds, batch_size=3, max_length=64, packing=False, seed=0).epoch_batches())
    assert len(packed) < len(unpacked)
    assert sum(b["num_trainable"] for b in packed) == sum(b["num_trainable"] for b in unpacked)
    loss_p, grads_p = step(model, packed)
    loss_u, grads_u = step(model, unpacked)
    assert loss_p == pytest.approx(loss_u, abs=1e-5) and 4 < loss_u < 8
    for name, g in grads_u.items():
        torch.testing.assert_close(grads_p[name], g, rtol=1e-5, atol=1e-5, msg=name)
    # the test can fail: without restarting positions, packed examples see each other
    b = packed[0]
    plain = torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"])
    with torch.no_grad():
        assert abs(shifted_loss_sum(model, b, plain).item() - shifted_loss_sum(model, b).item()) > 1e-3


@pytest.mark.parametrize("packing", [True, False])
def test_stream_is_deterministic_and_resumes_exactly(packing):
    ds = small_dataset()
    make = lambda seed=0: BatchStream(ds, batch_size=2, max_length=64, packing=packing, seed=seed)  # noqa: E731
    per_epoch = make().microbatches_per_epoch()
    n = 3 * per_epoch + 1
    run = lambda stream: [rows_of(stream.next()) for _ in range(n)]  # noqa: E731
    a = run(make())
    assert a == run(make())
    assert a[:per_epoch] != a[per_epoch : 2 * per_epoch]  # reshuffled each epoch
    assert a != run(make(seed=1))
    first = make()
    for _ in range(per_epoch + 1):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))
    assert (state["epoch"], state["position"]) == (1, 1)
    resumed = make()
    resumed.load_state_dict(state)
    assert [rows_of(resumed.next()) for _ in range(n - per_epoch - 1)] == a[per_epoch + 1 :]
    with pytest.raises(UserError, match="batch_size x processes is 3 now but 2 in the checkpoint; resume with "
                       "train.batch_size=2 for 1 process$"):
        BatchStream(ds, batch_size=3, max_length=64, packing=packing, seed=0).load_state_dict(state)
    # the message names the batch_size that gives the checkpoint's rows a step with this many processes
    with pytest.raises(UserError, match="is 4 now but 2 in the checkpoint; resume with train.batch_size=1 for 2 processes$"):
        BatchStream(ds, batch_size=2, max_length=64, packing=packing, seed=0, world_size=2).load_state_dict(state)
    with pytest.raises(UserError, match="resume with a number of processes that divides 2, and batch_size to match$"):
        BatchStream(ds, batch_size=1, max_length=64, packing=packing, seed=0, world_size=3).load_state_dict(state)


@pytest.mark.parametrize("packing", [True, False])
def test_rank_shards_union_equals_single_process(packing):
    ds = small_dataset()
    one = BatchStream(ds, batch_size=4, max_length=64, packing=packing, seed=3)
    ranks = [BatchStream(ds, batch_size=2, max_length=64, packing=packing, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert one.microbatches_per_epoch() == ranks[0].microbatches_per_epoch() == ranks[0].num_rows // 4
    for _ in range(2 * one.microbatches_per_epoch() + 1):
        assert rows_of(one.next()) == rows_of(ranks[0].next()) + rows_of(ranks[1].next())
    # a run resumed with another world size continues the same global stream
    single_state = one.state_dict()
    again = BatchStream(ds, batch_size=2, max_length=64, packing=packing, seed=3, rank=1, world_size=2)
    again.load_state_dict(single_state)
    assert rows_of(again.next()) == rows_of(one.next())[2:]
    # eval pass: every row once on some rank, the same number of batches everywhere
    evals = [list(s.epoch_batches()) for s in ranks]
    assert len(evals[0]) == len(evals[1]) == -(-ranks[0].num_rows // 4)
    seen = [r for batches in evals for b in batches for r in rows_of(b) if r[0]]
    assert sum(b["num_trainable"] for batches in evals for b in batches) == ds.stats.trainable_tokens
    assert len(seen) == ranks[0].num_rows


def test_unpacked_batches_are_bucketed_by_length():
    ds = small_dataset(64)
    stream = BatchStream(ds, batch_size=4, max_length=64, packing=False, seed=0)
    padded = lambda b: b["input_ids"].numel() - b["num_tokens"]  # noqa: E731
    bucketed = sum(padded(stream.next()) for _ in range(stream.microbatches_per_epoch()))
    rng = np.random.default_rng(0)
    lengths = ds.lengths()[rng.permutation(64)].reshape(-1, 4)
    random_padding = int((lengths.max(1, keepdims=True) - lengths).sum())
    assert bucketed < random_padding / 2
