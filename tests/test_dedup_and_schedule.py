"""Fast unit checks of two pure functions the end-to-end tests only reach through Ray: collect's dedup (the first
document in input order wins) and the trainer's learning-rate schedule (linear warmup, cosine to min_ratio)."""

from __future__ import annotations

import hashlib
import math

import pyarrow as pa
import pytest

from apollo_ray.data import collect
from apollo_ray.train.loop import lr_lambda

PERM = 128
BASE = ("Malaria is a life-threatening disease caused by Plasmodium parasites that are transmitted to people "
        "through the bites of infected female Anopheles mosquitoes; it is preventable and curable.")
NEAR = BASE.replace("life-threatening", "serious")  # estimated Jaccard with BASE ~0.86
OTHER = "Hypertension is persistently raised blood pressure in the arteries and is a major cardiovascular risk."


def _docs(rows: list[tuple[str, str | None, str]]) -> pa.Table:
    """(order, reason, text) → the dedup columns as collect computes them."""
    out = []
    for order, reason, text in rows:
        key = collect.normalise(text)
        out.append({"order": order, "reason": reason, "exact": hashlib.sha256(key.encode()).hexdigest(),
                    "minhash": collect.minhash(text, PERM), "kind": "web", "language": "en",
                    "language_mismatch": False})
    return pa.Table.from_pylist(out)


def test_dedup_first_document_in_input_order_wins():
    """Catches dedup keeping the last copy (or following table order instead of ``order``)."""
    # written out of order on purpose: the table order must not matter, only the ``order`` key
    table = _docs([("0000:000001:000000000007", None, NEAR), ("0000:000001:000000000003", None, BASE),
                   ("0000:000000:000000000009", None, OTHER), ("0001:000000:000000000001", None, BASE),
                   ("0000:000000:000000000001", "too_short", BASE)])
    dropped = collect.dedup(table, threshold=0.75, num_perm=PERM)
    assert dropped == {"0001:000000:000000000001": "exact_duplicate", "0000:000001:000000000007": "near_duplicate"}


def test_dedup_keeps_documents_below_the_threshold():
    """Catches a near-duplicate rule that drops every LSH candidate, or compares with the wrong bound."""
    assert collect.dedup(_docs([("1", None, BASE), ("2", None, OTHER)]), threshold=0.8, num_perm=PERM) == {}
    near = _docs([("1", None, BASE), ("2", None, NEAR)])
    assert collect.dedup(near, threshold=0.75, num_perm=PERM) == {"2": "near_duplicate"}
    assert collect.dedup(near, threshold=0.95, num_perm=PERM) == {}


@pytest.mark.parametrize("total,warmup_ratio,min_ratio", [(100, 0.1, 0.1), (40, 0.03, 0.0), (7, 0.5, 0.2)])
def test_lr_schedule_warmup_then_cosine(total, warmup_ratio, min_ratio):
    """Catches an off-by-one warmup (a first step at lr 0), a wrong warmup length, or a cosine not ending at
    min_ratio."""
    warmup = max(1, math.ceil(warmup_ratio * total))
    got = [lr_lambda(s, total, warmup_ratio, min_ratio) for s in range(total + 1)]
    assert got[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert got[0] > 0 and got[warmup - 1] == pytest.approx(1.0)
    for s in range(warmup, total + 1):
        progress = (s - warmup) / max(1, total - warmup)
        assert got[s] == pytest.approx(min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert got[warmup] == pytest.approx(1.0) and got[total] == pytest.approx(min_ratio)
    assert all(a >= b for a, b in zip(got[warmup:], got[warmup + 1:]))  # decays monotonically after warmup
