"""One test per index mapping : how channel ids move through remapping ops."""

from __future__ import annotations

import numpy as np

from onnxprune.analysis.index_mapping import (
    FIXED,
    ConcatMapping,
    GroupedMapping,
    RepeatMapping,
    SliceMapping,
    SplitAxisMapping,
    TransposeMapping,
    keep_positions,
)


def ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_concat_places_inputs_end_to_end_and_fills_unmapped_with_fixed() -> None:
    out = ConcatMapping((2, 3)).apply([ids(7, 8), None])
    assert out.tolist() == [7, 8, FIXED, FIXED, FIXED]


def test_slice_keeps_a_range() -> None:
    assert SliceMapping(1, 3).apply(ids(4, 5, 6, 7)).tolist() == [5, 6]


def test_repeat_gives_each_channel_a_block() -> None:
    assert RepeatMapping(2).apply(ids(1, 2)).tolist() == [1, 1, 2, 2]


def test_split_axis_reads_ids_on_the_axis_they_follow() -> None:
    heads = SplitAxisMapping((2, 3))  # 2 heads of 3 dims
    assert heads.ids_on(ids(5, 5, 5, 9, 9, 9), 0).tolist() == [5, 9]
    assert heads.ids_on(ids(5, 5, 5, 9, 9, 9), 1) is None
    shuffle = SplitAxisMapping((2, 3))  # 2 shuffle groups of 3
    assert shuffle.ids_on(ids(1, 2, 3, 1, 2, 3), 1).tolist() == [1, 2, 3]


def test_split_axis_ties_list_what_must_be_coupled() -> None:
    fused = SplitAxisMapping((3, 2, 2))  # q/k/v, 2 heads, 2 dims
    cols = fused.ties(np.arange(12), 1)
    assert len(cols) == 6 and all(len(c) == 2 for c in cols)
    assert cols[0].tolist() == [0, 2] and cols[1].tolist() == [1, 3] and cols[2].tolist() == [4, 6]


def test_grouped_blocks_and_tile() -> None:
    g = GroupedMapping(2)
    assert [b.tolist() for b in g.blocks(ids(1, 2, 3, 4))] == [[1, 2], [3, 4]]
    assert g.tile(ids(1, 2)).tolist() == [1, 2, 1, 2]


def test_transpose_moves_the_axis() -> None:
    assert TransposeMapping((0, 2, 1, 3)).axis(1) == 2


def test_keep_positions_spares_fixed_and_drops_removed_classes() -> None:
    class_of = ids(0, 0, 2)  # ids 0 and 1 share class 0
    mask = keep_positions(ids(0, 1, 2, FIXED), ids(0), class_of)
    assert mask.tolist() == [False, False, True, True]
