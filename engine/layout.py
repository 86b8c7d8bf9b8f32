"""Where an adapter's weights sit inside its pool pages (plain integers; see docs/pool-layout.md).

An adapter owns a page table (its pages, in order). Its weights for one layer occupy a virtual address
range 0..num_pages*page_elements, cut into pages. For every target module, in the fixed order of
`TARGET_MODULES`, the rank rows of A (each `in_features` long) and then the rank rows of Bᵀ (each
`out_features` long) are packed one after another, each starting at a multiple of 8 elements and skipping
to the next page when a row would straddle a page boundary. The same virtual layout is used in every
layer's buffer (a page id names the same slot in every layer), so one row table serves all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.engine.config import TARGET_MODULES


@dataclass(frozen=True)
class ModuleRows:
    """Virtual start offsets of the A rows and Bᵀ rows of one target module (rank = len(a_rows))."""

    a_rows: tuple[int, ...]
    b_rows: tuple[int, ...]


@dataclass(frozen=True)
class AdapterLayout:
    """The packing of one adapter: per-module row offsets and the number of pages it needs."""

    page_elements: int
    modules: dict[str, ModuleRows]
    num_pages: int

    @classmethod
    def build(
        cls, ranks: dict[str, int], module_dims: dict[str, tuple[int, int]], page_elements: int
    ) -> AdapterLayout:
        """Unsharded adapter: module m has `ranks[m]` A rows of in_features and as many Bᵀ rows of out_features."""
        matrices = {m: (r, module_dims[m][0], r, module_dims[m][1]) for m, r in ranks.items() if r > 0}
        return cls.from_matrices(matrices, page_elements)

    @classmethod
    def from_matrices(cls, matrices: dict[str, tuple[int, int, int, int]], page_elements: int) -> AdapterLayout:
        """Pack modules in `TARGET_MODULES` order; matrices[m] = (A rows, A row width, Bᵀ rows, Bᵀ row width).
        Under tensor parallelism the rows and widths are the rank's shard (the same on every rank)."""
        cursor = 0
        modules: dict[str, ModuleRows] = {}
        for name in TARGET_MODULES:
            if name not in matrices:
                continue
            a_count, a_width, b_count, b_width = matrices[name]
            a_rows, cursor = _pack_rows(cursor, a_count, a_width, page_elements)
            b_rows, cursor = _pack_rows(cursor, b_count, b_width, page_elements)
            modules[name] = ModuleRows(tuple(a_rows), tuple(b_rows))
        num_pages = -(-cursor // page_elements)
        return cls(page_elements=page_elements, modules=modules, num_pages=num_pages)

    def physical(self, virtual: int, page_table: list[int]) -> int:
        """Flat offset in a layer's pool buffer of a virtual offset, through the adapter's page table."""
        page, offset = divmod(virtual, self.page_elements)
        return page_table[page] * self.page_elements + offset


ROW_ALIGN = 8  # elements: rows start 16-byte aligned in fp16/bf16, so kernels may use vector loads


def _pack_rows(cursor: int, count: int, width: int, page_elements: int) -> tuple[list[int], int]:
    """Place `count` rows of `width` elements from `cursor` so that no row straddles a page and every row
    starts at a multiple of ROW_ALIGN elements."""
    assert width <= page_elements, f"row of {width} elements does not fit a page of {page_elements}"
    assert page_elements % ROW_ALIGN == 0, "pages hold whole aligned rows"
    starts = []
    for _ in range(count):
        cursor += -cursor % ROW_ALIGN
        if cursor % page_elements + width > page_elements:
            cursor += page_elements - cursor % page_elements
        starts.append(cursor)
        cursor += width
    return starts, cursor
