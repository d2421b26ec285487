import pytest
import torch

from whalefast.core.ranking import NEW_WHALE_TARGET as NW
from whalefast.core.ranking import batch_threshold, calibrate_threshold, map5, map5_labels, rank_with_new_whale


def test_map5_hit_at_each_rank_and_miss():
    ranked = torch.tensor([[1, 2, 3, 4, 5]] * 6)
    targets = torch.tensor([1, 2, 3, 4, 5, 9])
    assert map5(ranked, targets) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5 + 0) / 6)


def test_map5_counts_only_first_hit_and_new_whale_code():
    assert map5(torch.tensor([[7, 7, 1, 2, 3]]), torch.tensor([7])) == 1.0
    assert map5(torch.tensor([[3, NW, 1, 2, 4]]), torch.tensor([NW])) == 0.5


def test_map5_labels_fewer_than_five_ids_and_new_whale():
    preds = [["w_a"], ["new_whale", "w_b"], ["w_c", "w_d", "new_whale"], []]
    truths = ["w_a", "w_b", "new_whale", "w_x"]
    assert abs(map5_labels(preds, truths) - (1 + 0.5 + 1 / 3 + 0) / 4) < 1e-12


def test_map5_labels_ignores_ids_after_the_fifth():
    assert map5_labels([["a", "b", "c", "d", "e", "t"]], ["t"]) == 0.0


def test_rank_inserts_new_whale_before_first_score_below_threshold():
    scores = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.03, 0.02], [0.05, 0.04, 0.03, 0.02, 0.01, 0.85]])
    ranked = rank_with_new_whale(scores, threshold=0.2)
    assert ranked.tolist() == [[0, 1, NW, 2, 3], [5, NW, 0, 1, 2]]
    assert rank_with_new_whale(scores, threshold=0.9)[:, 0].tolist() == [NW, NW]
    assert rank_with_new_whale(scores, threshold=0.0)[0].tolist() == [0, 1, 2, 3, 4]
    per_row = rank_with_new_whale(scores, threshold=torch.tensor([[0.4], [0.9]]))  # one threshold per row
    assert per_row.tolist() == [[0, NW, 1, 2, 3], [NW, 5, 0, 1, 2]]


def test_calibration_picks_threshold_that_maximises_map5():
    # Confident rows are catalogued whales, unsure ones are new: any threshold in (0.4, 0.6] is perfect.
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.4, 0.3, 0.3], [0.35, 0.35, 0.3]])
    targets = torch.tensor([0, 1, NW, NW])
    threshold, best = calibrate_threshold(scores, targets)
    assert best == 1.0
    assert 0.4 < threshold <= 0.8
    assert map5(rank_with_new_whale(scores, 0.0), targets) < best


def test_masked_cross_entropy_ignores_unseen_whales():
    import torch.nn.functional as F

    from whalefast.nets.losses import MaskedCrossEntropy

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [9.0, -9.0, 0.0]])
    targets = torch.tensor([0, 2, NW])
    assert float(MaskedCrossEntropy()(logits, targets)) == pytest.approx(float(F.cross_entropy(logits[:2], targets[:2])))
    assert float(MaskedCrossEntropy()(logits, torch.tensor([NW] * 3))) == 0.0


def test_a_batch_threshold_is_halfway_between_the_calibrated_one_and_the_shares_quantile():
    best = torch.tensor([0.5, 0.1, 0.4, 0.2, 0.3])
    assert batch_threshold(0.6, best, 0.5) == pytest.approx((0.6 + 0.3) / 2)  # half the photos' best scores below 0.3
    assert batch_threshold(0.6, best, 0.25) == pytest.approx((0.6 + 0.2) / 2)
    assert batch_threshold(0.1, best, 0.75) == pytest.approx((0.1 + 0.4) / 2)  # above a low calibrated threshold too
