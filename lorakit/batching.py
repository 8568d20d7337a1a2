"""Batches (`BatchStream`): rows are packed bins (best-fit decreasing, computed once; the bin order is
reshuffled every epoch) or single examples bucketed by length. There is no attention mask:
`position_ids` restart at 0 for every example and for the padding at the end of a row, and
transformers (masking_utils.find_packed_sequence_indices) turns restarting positions into a
block-diagonal causal mask when the model gets `attention_mask=None` and no KV cache
(`use_cache=False`). Packed and unpacked batches therefore give the same per-token losses.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any, Iterator

import numpy as np
import torch

from lorakit.data import IGNORE_INDEX, TokenizedDataset, rng_seed
from lorakit.errors import UserError


class BatchStream:
    """Endless, deterministic stream of micro-batches over epochs.

    Rows are packed bins (packing) or single examples. Each epoch orders the rows by a
    permutation drawn from (seed, epoch); micro-batch k of an epoch is the global chunk
    rows[k*G:(k+1)*G] with G = batch_size * world_size, and rank r takes rows
    [r*batch_size:(r+1)*batch_size] of it, so one process with batch_size 2b sees exactly the rows
    of 2 ranks with batch_size b. The incomplete last chunk of an epoch is dropped (the same rows
    in every setup with the same G; different rows every epoch, since the order changes).
    Without packing, rows are sorted by length inside windows of 64 chunks and the chunks of a
    window shuffled again, so a micro-batch holds examples of similar length (little padding).
    The state (epoch, micro-batches consumed) is global, so a run may resume with another
    world_size as long as G is the same.

    A micro-batch (B = batch_size rows, T = longest row in it):
        input_ids (B, T) int64, pad_id after the end of a row;
        labels (B, T) int64, aligned with input_ids (the loss shifts), -100 = no loss;
        position_ids (B, T) int64, restarting at 0 for each example and for the padding;
        num_tokens: int, tokens that are not padding;
        num_trainable: int, labels != -100 at positions 1.. (what a shifted loss counts).
    Feed the model `position_ids` with `attention_mask=None, use_cache=False`: transformers then
    builds a block-diagonal causal mask, so attention never crosses an example boundary.

    Preference data (`dataset.pairs`): a pair is what rows hold, pack and count: its chosen and
    rejected answers are two examples side by side in one row, which holds up to 2 x max_length
    tokens. Its micro-batches also have
        sequence_ids (B, T) int64: which example of the micro-batch a token belongs to, numbered
            along the rows (2p: pair p's chosen answer, 2p+1: its rejected one), -1 on padding;
        example_ids (S,) int64: which example of the dataset each of those S sequences is (where a
            per-example table, such as precomputed reference log-probabilities, is looked up);
        num_pairs: int;
        desirable (num_pairs,) bool, for unpaired (KTO) data, whose pairs are an example and its KL
            example: each example's label.
    """

    WINDOW_CHUNKS = 64

    def __init__(
        self,
        dataset: TokenizedDataset,
        *,
        batch_size: int,
        max_length: int,
        packing: bool,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int = 0,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        lengths = dataset.lengths()
        if len(lengths) == 0:
            raise UserError("the dataset has no examples")
        if lengths.max() > max_length:
            raise UserError(
                f"an example has {lengths.max()} tokens, more than max_length = {max_length}; build the "
                "dataset with the same data.max_length as the batches"
            )
        self.pairs = dataset.pairs
        self.example_max_length = max_length  # positions restart per example: never beyond this
        if self.pairs:  # the unit is a pair: both answers go into the same row
            lengths, max_length = lengths[0::2] + lengths[1::2], 2 * max_length
        self.dataset, self.batch_size, self.max_length = dataset, batch_size, max_length
        self.packing, self.seed, self.shuffle = packing, seed, shuffle
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        self.global_batch = batch_size * world_size
        # Row i holds the examples self._items[self._row_offsets[i]:self._row_offsets[i+1]].
        if packing:
            self._items, self._row_offsets = _pack(lengths, max_length)
        else:
            self._items, self._row_offsets = np.arange(len(lengths)), np.arange(len(lengths) + 1)
        self._row_lengths = np.add.reduceat(lengths[self._items], self._row_offsets[:-1])
        self.num_rows = len(self._row_offsets) - 1
        if self.num_rows < self.global_batch:
            what = "packed rows" if packing else ("pairs" if self.pairs else "examples")
            raise UserError(
                f"the dataset makes {self.num_rows} {what}, fewer than one micro-batch of batch_size x "
                f"processes = {self.global_batch} rows; lower train.batch_size or add data"
            )
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)

    def microbatches_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    def packing_efficiency(self) -> float:
        """Share of row slots holding tokens when rows are max_length long (1.0 = no padding)."""
        return float(self._row_lengths.sum()) / (self.num_rows * self.max_length)

    def next(self) -> dict[str, Any]:
        if self.position >= self.microbatches_per_epoch():
            self.epoch, self.position = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self._epoch_order(self.epoch), self.epoch
        g = self.position * self.global_batch + self.rank * self.batch_size
        self.position += 1
        return self._collate(self._order[g : g + self.batch_size])

    def epoch_batches(self) -> Iterator[dict[str, Any]]:
        """Every row once (for eval), in a fixed order that ignores the seed and the stream state;
        the last chunk may be short. A rank whose share of it is empty gets one all-padding row
        (num_trainable 0) so every rank runs the same number of forwards (FSDP needs that)."""
        order = np.arange(self.num_rows)
        if not self.packing:
            order = np.argsort(self._row_lengths, kind="stable")
        for k in range(0, self.num_rows, self.global_batch):
            g = k + self.rank * self.batch_size
            mine = order[g : min(g + self.batch_size, k + self.global_batch)]
            yield self._collate(mine)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch": self.global_batch,
            "packing": self.packing,
            "max_length": self.max_length,
            "num_rows": self.num_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` stopped. Raises UserError if the stream would differ."""
        mine = self.state_dict()
        for key in ("seed", "shuffle", "global_batch", "packing", "max_length", "num_rows"):
            if key in state and state[key] != mine[key]:
                what = {"global_batch": "batch_size x processes", "num_rows": "number of rows (data changed?)"}
                fix = "resume with the same data and settings"
                if key == "global_batch":  # the rows a step reads: the processes may change, their total may not
                    theirs = int(state[key])
                    fix = (f"resume with train.batch_size={theirs // self.world_size} for {self.world_size} "
                           f"process{'es' if self.world_size > 1 else ''}" if theirs % self.world_size == 0 else
                           f"resume with a number of processes that divides {theirs}, and batch_size to match")  # fmt: skip
                raise UserError(
                    f"cannot resume the data stream: {what.get(key, key)} is {mine[key]!r} now but "
                    f"{state[key]!r} in the checkpoint; {fix}"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Row ids of one epoch, a multiple of global_batch long (the incomplete chunk dropped)."""
        n, g = self.num_rows, self.global_batch
        rng = np.random.default_rng([rng_seed(self.seed), epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        order = order[: (n // g) * g]
        if self.packing:
            return order
        window = g * self.WINDOW_CHUNKS
        out = []
        for w in range(0, len(order), window):
            rows = order[w : w + window]
            rows = rows[np.argsort(self._row_lengths[rows], kind="stable")].reshape(-1, g)
            if self.shuffle:
                rows = rows[rng.permutation(len(rows))]
            out.append(rows.reshape(-1))
        return np.concatenate(out)

    def _collate(self, rows: np.ndarray) -> dict[str, Any]:
        ds = self.dataset
        width = int(self._row_lengths[rows].max()) if len(rows) else 1
        b = max(len(rows), 1)
        input_ids = np.full((b, width), self.pad_id, dtype=np.int64)
        labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.zeros((b, width), dtype=np.int64)
        sequence_ids = np.full((b, width), -1, dtype=np.int64) if self.pairs else None
        example_ids: list[int] = []
        desirable = [] if ds.desirable is not None else None
        num_tokens = sequence = 0
        for r, row in enumerate(rows):
            units = self._items[self._row_offsets[row] : self._row_offsets[row + 1]]
            if desirable is not None:
                desirable.extend(ds.desirable[units])
            t = 0
            for e in np.stack([2 * units, 2 * units + 1], axis=1).reshape(-1) if self.pairs else units:
                a, z = ds.offsets[e], ds.offsets[e + 1]
                input_ids[r, t : t + z - a] = ds.input_ids[a:z]
                labels[r, t : t + z - a] = ds.labels[a:z]
                labels[r, t] = IGNORE_INDEX  # never predict an example's first token from the previous one
                position_ids[r, t : t + z - a] = np.arange(z - a)
                if sequence_ids is not None:
                    sequence_ids[r, t : t + z - a] = sequence
                    example_ids.append(int(e))
                    sequence += 1
                t += z - a
            # padding: segments of its own, no labels, positions within what an example may use (a
            # row of pairs is up to twice as long, a table of positions is not)
            position_ids[r, t:] = np.arange(width - t) % self.example_max_length
            num_tokens += t
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
            "num_tokens": num_tokens,
            "num_trainable": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        }
        if sequence_ids is not None:
            batch["sequence_ids"], batch["num_pairs"] = torch.from_numpy(sequence_ids), sequence // 2
            batch["example_ids"] = torch.tensor(example_ids, dtype=torch.int64)
        if desirable is not None:
            batch["desirable"] = torch.tensor(desirable, dtype=torch.bool)
        return batch


def _pack(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing bin packing -> (example ids, row offsets), rows in creation order.

    Which examples share a row does not change the loss (attention and labels stop at example
    boundaries), so bins are computed once, tightly, and only their order is shuffled per epoch.
    """
    free: list[tuple[int, int]] = []  # (free slots, row) of rows that still have room, sorted
    rows: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        j = bisect.bisect_left(free, (n, -1))  # the fullest row the example fits in
        if j == len(free):
            rows.append([i])
            room, row = max_length - n, len(rows) - 1
        else:
            room, row = free.pop(j)
            rows[row].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    items = np.fromiter(itertools.chain.from_iterable(sorted(r) for r in rows), dtype=np.int64, count=len(lengths))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    return items, offsets
