"""RowTables (the runner's per-module row tables of resident adapters) against the tables built from Python
lists, as adapters of random ranks and modules load, leave and load again (growing capacity and width)."""

from __future__ import annotations

import random

import torch

from lorafleet.engine.config import TARGET_MODULES
from lorafleet.engine.runner import RowTables


def _padded(tables: list[list[int]]) -> torch.Tensor:
    """The tables as one [len(tables), max(1, longest)] int64 tensor, zero-filled."""
    out = torch.zeros(len(tables), max(1, *map(len, tables)), dtype=torch.int64)
    for i, table in enumerate(tables):
        out[i, : len(table)] = torch.tensor(table, dtype=torch.int64)
    return out


def test_row_tables_equal_list_built_tables_under_churn():
    rng = random.Random(11)
    tables, resident = RowTables(width=4), {}
    for step in range(300):
        if resident and rng.random() < 0.4:
            name = rng.choice(list(resident))
            tables.remove(name)
            del resident[name]
        else:
            name = f"a{rng.randrange(40)}"
            rank = rng.choice((1, 2, 3, 8, 16, 70))
            modules = rng.sample(TARGET_MODULES, rng.randint(1, len(TARGET_MODULES)))
            rows = {m: ([rng.randrange(10**9) for _ in range(rank)], [rng.randrange(10**9) for _ in range(rank)])
                    for m in modules}
            tables.add(name, rows)
            resident[name] = rows
        if not resident:
            continue
        slots = rng.sample(list(resident), rng.randint(1, len(resident)))
        for module in TARGET_MODULES:
            a, b, counts = tables.tables(slots, module)
            a_lists = [resident[n].get(module, ([], []))[0] for n in slots]
            b_lists = [resident[n].get(module, ([], []))[1] for n in slots]
            assert torch.equal(a, _padded(a_lists)) and torch.equal(b, _padded(b_lists)), (step, module)
            assert counts == [len(t) for t in a_lists] == [len(t) for t in b_lists]
            assert a.dtype == torch.int64 and isinstance(counts[0], int)
    assert tables.width >= 70 and len(tables.index) == len(resident)
    assert len(set(tables.index.values())) == len(tables.index)  # no two adapters share a matrix row
