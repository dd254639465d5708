"""Packing tokenized documents into fixed-length rows, without attention or loss crossing documents.

Apollo's reference reads the sampled order in batches of 256 and greedily fills 4096-token rows, padding the rest:
on long-tail lengths that leaves ~12 % of every step as padding, and attention crosses documents inside a row. Here:

* **Best-fit decreasing** over windows of ``window`` documents in sampler order: inside a window, pieces are placed
  longest first into the open row with the least room that still fits them (≥ 99 % fill on Apollo-like lengths). BFD
  reorders documents only inside a window, so the priority curriculum survives at window granularity; a larger window
  packs tighter but blurs the order more. Rows never span windows, so a resumed run restarts at a window boundary
  with the same rows.
* **Documents stay whole** unless they are longer than a row. ``min_split`` may cut a document across two rows, but a
  window keeps the cut layout only when it needs at least ``MIN_ROW_SAVING`` fewer rows than whole documents: a cut
  tail trains without its question, which is worth it only for a real gain in fill (``bench/packing.py``).
* **Documents stay apart.** ``position_ids`` restart at 0 at every document (and at every piece of a document longer
  than ``seq_len``); padding is a block of its own, positions 0, 1, ... . Boundaries are where a position is not the
  previous one plus one — the rule transformers uses to detect packed rows. ``seq_lens`` / ``cu_seqlens`` give the
  same boundaries for varlen attention kernels.
* **Loss stays inside documents.** Labels follow the Hugging Face convention (unshifted; the model shifts them). The
  label of each piece's first token is −100: after the shift it would be predicted from the *previous* document's
  last token. (Templated conversations start with an unlabelled prompt, so no answer token is lost.)

How the trainer must call a Hugging Face model (checked on transformers 5.23, sdpa and eager; see
``tests/test_packing.py``): ``model(input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)``.
transformers builds the document-block causal mask from ``position_ids`` only when there is no 2-D attention mask
*and no cache* — and with ``config.use_cache=True`` (Qwen2's default) it creates a ``DynamicCache`` even in training
mode, which silently turns detection off and lets attention cross documents. When in doubt, pass
``attention_mask=attention_bias(position_ids, dtype)``: a 4-D additive mask is used as given by every
implementation.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IGNORE_INDEX = -100
PAD_LANGUAGE = -1
REFERENCE_BATCH = 256
# A window keeps a layout with cut documents only if it saves at least this share of its rows: on long-tail lengths
# cutting saves none (bench/packing.py: 0.9988 fill either way, 8.5 % of documents cut), on documents about a row long
# (the sample mixture in 256-token rows) it saves 5 %.
MIN_ROW_SAVING = 0.01


@dataclass(frozen=True)
class Doc:
    """One tokenized training item. ``labels=None`` means every token is a target (plain text)."""
    input_ids: Sequence[int]
    labels: Sequence[int] | None
    language_id: int
    meta: Any = None


@dataclass(frozen=True)
class Row:
    """One packed row of ``seq_len`` tokens: documents back to back, then padding."""
    input_ids: np.ndarray      # int64[T]
    labels: np.ndarray         # int64[T], −100 on padding and on each piece's first token
    position_ids: np.ndarray   # int64[T], restarting at 0 per piece and for the padding block
    language_ids: np.ndarray   # int64[T], the document's expert id; −1 on padding
    seq_lens: tuple[int, ...]  # length of each document piece, in row order (padding not included)
    docs: tuple[int, ...]      # input index of the document of each piece
    starts: tuple[int, ...]    # offset of each piece in its document (0 unless the document was split)
    meta: tuple[Any, ...]      # that document's meta, per piece

    @property
    def n_tokens(self) -> int:
        return sum(self.seq_lens)

    @property
    def pad(self) -> int:
        return len(self.input_ids) - self.n_tokens

    @property
    def cu_seqlens(self) -> np.ndarray:
        """int32 boundaries for varlen kernels, padding as a last segment of its own so the last entry is T."""
        lens = [*self.seq_lens, self.pad] if self.pad else list(self.seq_lens)
        return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


@dataclass(frozen=True)
class PackResult:
    rows: list[Row]
    fill: float                 # non-pad tokens / (rows × seq_len)
    n_docs: int                 # documents packed (empty ones excluded)
    n_split: int                # documents longer than seq_len, cut into pieces
    n_pieces: int               # pieces placed (= n_docs + the extra pieces of split documents)
    n_empty: int = 0            # empty documents skipped
    n_cut: int = 0              # documents placed in more than one piece (too long for a row, or cut by min_split)
    stats: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------ packing
_Piece = tuple[int, int, int]  # (doc index, start, length)


def _pieces(docs: Sequence[Doc], seq_len: int) -> tuple[list[list[_Piece]], int, int]:
    """Per document, its pieces of at most ``seq_len`` tokens; also the split and empty counts."""
    out: list[list[_Piece]] = []
    n_split = n_empty = 0
    for i, d in enumerate(docs):
        n = len(d.input_ids)
        if d.labels is not None and len(d.labels) != n:
            raise ValueError(f"document {i}: {len(d.labels)} labels for {n} tokens")
        if n == 0:
            n_empty += 1
            out.append([])
            continue
        n_split += n > seq_len
        out.append([(i, s, min(seq_len, n - s)) for s in range(0, n, seq_len)])
    return out, n_split, n_empty


def _bfd(pieces: list[_Piece], seq_len: int, min_split: int = 0) -> list[list[_Piece]]:
    """Best-fit decreasing: longest first, each into the open row whose remaining room is the smallest that fits.

    Open rows are kept by remaining capacity: a sorted list of the distinct capacities (bisect) and, per capacity, a
    FIFO of rows — O(log) lookups, and among equally good rows the oldest wins, which keeps sampler order a little.

    ``min_split`` > 0: when a piece fits no open row and the roomiest open row has at least ``min_split`` tokens free,
    the piece is cut — its head fills that row, its tail goes back in the queue — instead of opening a new row. The
    price is a tail piece that starts without its document's beginning (its first label is masked like any piece);
    ``pack`` keeps such a layout only where it saves enough rows.
    """
    heap = [(-p[2], k, p) for k, p in enumerate(pieces)]  # stable: equal lengths keep sampler order
    heapq.heapify(heap)
    tie = len(pieces)
    rows: list[list[_Piece]] = []
    caps: list[int] = []
    by_cap: dict[int, deque[int]] = {}

    def take(i: int) -> tuple[int, int]:
        cap = caps[i]
        r = by_cap[cap].popleft()
        if not by_cap[cap]:
            del by_cap[cap]
            caps.pop(i)
        return cap, r

    while heap:
        _, _, p = heapq.heappop(heap)
        i = bisect.bisect_left(caps, p[2])
        if i < len(caps):
            cap, r = take(i)
        elif min_split and caps and caps[-1] >= min_split:
            cap, r = take(len(caps) - 1)
            head, tail = (p[0], p[1], cap), (p[0], p[1] + cap, p[2] - cap)
            heapq.heappush(heap, (-tail[2], tie, tail))
            tie += 1
            p = head
        else:
            cap, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(p)
        left = cap - p[2]
        if left > 0:
            if left not in by_cap:
                bisect.insort(caps, left)
                by_cap[left] = deque()
            by_cap[left].append(r)
    # Inside a row, pieces go back to sampler order; rows are ordered by their earliest piece.
    for row in rows:
        row.sort(key=lambda q: (q[0], q[1]))
    rows.sort(key=lambda row: (row[0][0], row[0][1]))
    return rows


def pack(docs: Sequence[Doc], seq_len: int, pad_id: int, window: int = 4096, min_split: int = 0) -> PackResult:
    """Pack ``docs`` (in sampler order) into rows of ``seq_len`` tokens by best-fit decreasing per window
    (``min_split``: see ``_bfd``)."""
    if seq_len < 1 or window < 1:
        raise ValueError(f"seq_len and window must be >= 1, got {seq_len}, {window}")
    per_doc, n_split, n_empty = _pieces(docs, seq_len)
    layout: list[list[_Piece]] = []
    cut_windows = 0
    for w in range(0, len(per_doc), window):
        pieces = [p for ps in per_doc[w:w + window] for p in ps]
        whole = _bfd(pieces, seq_len)
        if min_split:
            # Fill = tokens / (rows × seq_len), so fewer rows is the only gain cutting can bring.
            cut = _bfd(pieces, seq_len, min_split)
            if len(cut) <= len(whole) * (1 - MIN_ROW_SAVING):
                whole = cut
                cut_windows += 1
        layout += whole
    return _materialize(docs, layout, seq_len, pad_id, n_split, n_empty,
                        stats={"method": "bfd", "window": window, "min_split": min_split, "cut_windows": cut_windows})


def greedy_pack(docs: Sequence[Doc], seq_len: int, pad_id: int, batch: int = REFERENCE_BATCH) -> PackResult:
    """Apollo's reference packing, for comparison: per batch of 256 documents, append while the next one fits, else
    pad and start a new row; the batch's last row is padded. (The reference truncates documents longer than
    ``seq_len``; here they are split like in ``pack`` so that both see the same tokens.)"""
    if seq_len < 1 or batch < 1:
        raise ValueError(f"seq_len and batch must be >= 1, got {seq_len}, {batch}")
    per_doc, n_split, n_empty = _pieces(docs, seq_len)
    layout: list[list[_Piece]] = []
    for b in range(0, len(per_doc), batch):
        cur: list[_Piece] = []
        used = 0
        for p in (p for ps in per_doc[b:b + batch] for p in ps):
            if used + p[2] > seq_len:
                layout.append(cur)
                cur, used = [], 0
            cur.append(p)
            used += p[2]
        if cur:
            layout.append(cur)
    return _materialize(docs, layout, seq_len, pad_id, n_split, n_empty, stats={"method": "greedy", "batch": batch})


def _materialize(docs: Sequence[Doc], layout: list[list[_Piece]], seq_len: int, pad_id: int, n_split: int,
                 n_empty: int, stats: dict[str, Any]) -> PackResult:
    rows: list[Row] = []
    last: tuple[int, np.ndarray, np.ndarray] | None = None

    def arrays(i: int) -> tuple[np.ndarray, np.ndarray]:
        nonlocal last
        if last is None or last[0] != i:  # consecutive pieces of a split document convert it once
            d = docs[i]
            ids = np.asarray(d.input_ids, dtype=np.int64)
            last = (i, ids, ids if d.labels is None else np.asarray(d.labels, dtype=np.int64))
        return last[1], last[2]

    tokens = 0
    for layout_row in layout:
        input_ids = np.full(seq_len, pad_id, dtype=np.int64)
        labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
        position_ids = np.empty(seq_len, dtype=np.int64)
        language_ids = np.full(seq_len, PAD_LANGUAGE, dtype=np.int64)
        at = 0
        for i, start, n in layout_row:
            ids, lab = arrays(i)
            input_ids[at:at + n] = ids[start:start + n]
            labels[at:at + n] = lab[start:start + n]
            labels[at] = IGNORE_INDEX
            position_ids[at:at + n] = np.arange(n)
            language_ids[at:at + n] = docs[i].language_id
            at += n
        if at > seq_len:
            raise AssertionError(f"row overflow: {at} > {seq_len}")  # a packing bug, never bad input
        position_ids[at:] = np.arange(seq_len - at)
        tokens += at
        rows.append(Row(input_ids, labels, position_ids, language_ids,
                        seq_lens=tuple(p[2] for p in layout_row), docs=tuple(p[0] for p in layout_row),
                        starts=tuple(p[1] for p in layout_row),
                        meta=tuple(docs[p[0]].meta for p in layout_row)))
    n_pieces = sum(len(r) for r in layout)
    n_cut = len({p[0] for r in layout for p in r if p[1] > 0})  # a document with a piece not at its start
    fill = tokens / (len(rows) * seq_len) if rows else 0.0
    return PackResult(rows=rows, fill=fill, n_docs=len(docs) - n_empty, n_split=n_split, n_pieces=n_pieces,
                      n_empty=n_empty, n_cut=n_cut, stats=stats)


def stack(rows: Sequence[Row]) -> dict[str, np.ndarray]:
    """A micro-batch: the rows' per-token arrays stacked to [B, T]."""
    return {k: np.stack([getattr(r, k) for r in rows])
            for k in ("input_ids", "labels", "position_ids", "language_ids")}


# ------------------------------------------------------------------------------------------------------------ masking
def document_ids(position_ids: np.ndarray) -> np.ndarray:
    """Index of the document (block) of every token: a new block wherever a position is not the previous plus one —
    the same rule as transformers' packed-sequence detection, so both agree on any row."""
    pos = np.asarray(position_ids)
    starts = np.ones(pos.shape, dtype=bool)
    starts[..., 1:] = pos[..., 1:] != pos[..., :-1] + 1
    return np.cumsum(starts, axis=-1) - 1


def block_causal_mask(position_ids: np.ndarray) -> np.ndarray:
    """bool[..., T, T], True where query t may attend key s: s ≤ t and both in the same document."""
    doc = document_ids(position_ids)
    t = doc.shape[-1]
    causal = np.tril(np.ones((t, t), dtype=bool))
    return causal & (doc[..., :, None] == doc[..., None, :])


def attention_bias(position_ids: Any, dtype: Any = None) -> Any:
    """4-D additive mask [B, 1, T, T] (0 where allowed, dtype's min elsewhere) as a torch tensor.

    The explicit fallback to automatic detection: transformers passes a 4-D mask through untouched, and an *additive*
    float mask is the form both eager (which adds it to the scores) and sdpa accept — a bool mask would be added as
    0/1 by eager attention.
    """
    import torch

    pos = torch.as_tensor(position_ids)
    if pos.ndim == 1:
        pos = pos[None]
    dtype = dtype or torch.float32
    allowed = torch.from_numpy(block_causal_mask(pos.cpu().numpy())).to(pos.device)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=pos.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]
