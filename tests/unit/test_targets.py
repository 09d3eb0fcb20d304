"""Hand-worked alignment: which token each position predicts at depths 0..3."""

import torch

from mtp_plugin.core import all_depth_targets, depth_targets, shift_left

# Window t_1..t_6 = 10 11 12 13 14 15, and t_7 = 16 is the label of the last position.
IDS = torch.tensor([[10, 11, 12, 13, 14, 15]])
LABELS = torch.tensor([[11, 12, 13, 14, 15, 16]])
ALL = torch.ones_like(IDS, dtype=torch.bool)


def test_shift_left_fills_tail_without_wrapping():
    assert shift_left(IDS, 2, fill=-1).tolist() == [[12, 13, 14, 15, -1, -1]]
    assert shift_left(IDS, 0).tolist() == IDS.tolist()
    assert shift_left(IDS, 9, fill=7).tolist() == [[7] * 6]


def test_hand_worked_depths():
    d1, d2, d3 = all_depth_targets(IDS, LABELS, ALL, 3)
    # depth 1 at position i consumes t_{i+1} and predicts t_{i+2}
    assert d1.input_ids_bs.tolist() == [[11, 12, 13, 14, 15, 0]]
    assert d1.labels_bs[0, :5].tolist() == [12, 13, 14, 15, 16]
    assert d1.loss_mask_bs.tolist() == [[True] * 5 + [False]]
    # depth 2 predicts t_{i+3}; the last two positions have no target (tail)
    assert d2.input_ids_bs[0, :4].tolist() == [12, 13, 14, 15]
    assert d2.labels_bs[0, :4].tolist() == [13, 14, 15, 16]
    assert d2.loss_mask_bs.tolist() == [[True] * 4 + [False] * 2]
    # depth 3 predicts t_{i+4}: position 0 (t_1 = 10) predicts 14
    assert d3.labels_bs[0, 0].item() == 14
    assert d3.loss_mask_bs.sum().item() == 3


def test_loss_mask_is_shifted_with_the_targets():
    mask = torch.tensor([[True, True, False, True, True, True]])  # label of position 2 (= t_4 = 13) masked
    d1 = depth_targets(IDS, LABELS, mask, 1)
    # depth 1 at position 1 predicts t_4, masked in the main labels -> masked here too
    assert d1.loss_mask_bs.tolist() == [[True, False, True, True, True, False]]


def test_eod_masking_across_documents():
    eod = 0
    ids = torch.tensor([[5, 6, eod, 7, 8, 9]])  # doc A = 5 6 <eod>, doc B = 7 8 9
    labels = torch.tensor([[6, eod, 7, 8, 9, 4]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    main = depth_targets(ids, labels, mask, 0, eod_id=eod)
    # position 2 (the EOD) would predict the first token of doc B: invalid
    assert main.loss_mask_bs.tolist() == [[True, True, False, True, True, True]]
    d1 = depth_targets(ids, labels, mask, 1, eod_id=eod)
    # position 0 predicts t_3 = EOD (end of its own doc): valid; position 1 predicts t_4 = 7 (doc B): invalid
    assert d1.labels_bs[0, 0].item() == eod
    assert d1.loss_mask_bs.tolist() == [[True, False, False, True, True, False]]
    d2 = depth_targets(ids, labels, mask, 2, eod_id=eod)
    assert d2.loss_mask_bs.tolist() == [[False, False, False, True, False, False]]
    # without eod_id nothing but the tail is masked
    assert depth_targets(ids, labels, mask, 2).loss_mask_bs.sum().item() == 4


def test_depth_must_fit_in_window():
    import pytest

    with pytest.raises(ValueError, match="lower num_depths"):
        depth_targets(IDS, LABELS, ALL, 6)
