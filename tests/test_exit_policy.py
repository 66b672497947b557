import math

import pytest
import torch

from models.exit_policy import CachedOutputs, confidence, device_only_accuracy, evaluate_threshold


def test_confidence_top1_and_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(confidence(logits, "top1"), torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(confidence(logits, "entropy"), torch.tensor([0.0, 1.0]), atol=1e-5, rtol=0)
    p = torch.softmax(torch.tensor([1.0, 2.0]), 0)
    h = -(p * p.log()).sum()
    torch.testing.assert_close(confidence(torch.tensor([[1.0, 2.0]]), "entropy"),
                               torch.tensor([1 - h / math.log(2)]))
    with pytest.raises(ValueError, match="confidence"):
        confidence(logits, "margin")


def test_threshold_replay_matches_hand_computation():
    # 5 images, 2 device exits. Hand-worked at threshold 0.6:
    #  img0: exit0 conf .9 -> answered at exit0 (correct)
    #  img1: exit0 .5, exit1 .7 -> exit1 (wrong)
    #  img2: exit0 .65 -> exit0 (wrong)
    #  img3: .1, .2 -> cloud (final correct)
    #  img4: .3, .59 -> cloud (final wrong)
    cache = CachedOutputs(
        device_confidence=torch.tensor([[0.9, 0.5, 0.65, 0.1, 0.3], [0.95, 0.7, 0.9, 0.2, 0.59]]),
        device_correct=torch.tensor([[True, True, False, False, True], [True, False, False, True, True]]),
        final_correct=torch.tensor([True, True, True, True, False]),
        exit_points=[3, 7],
    )
    row = evaluate_threshold(cache, 0.6, upload_bytes=1000)
    assert row.exit_rates == [0.4, 0.2]
    assert row.uploading_rate == pytest.approx(0.4)
    assert row.accuracy == pytest.approx(2 / 5)  # img0 and img3
    assert row.exit_accuracies == [0.5, 0.0]
    assert row.cloud_accuracy == pytest.approx(0.5)
    assert row.upload_bytes_per_image == pytest.approx(400)
    # threshold 0: everything answered by exit0; threshold above 1: everything uploaded
    assert evaluate_threshold(cache, 0.0, 1000).exit_rates == [1.0, 0.0]
    everything = evaluate_threshold(cache, 1.01, 1000)
    assert everything.uploading_rate == 1.0 and everything.accuracy == pytest.approx(0.8)
    assert everything.exit_accuracies == [None, None]
    assert device_only_accuracy(cache) == pytest.approx(0.6)
