"""The scan's decision statistics on cases whose answers are known, and the verdict built from them."""

import numpy as np
import pytest

from jaxrisk.scan.config import DecisionConfig
from jaxrisk.scan.decide import asymmetry, decide, size_statistics, suspects

NATURAL = np.array([60.0, 48.0, 35.0, 55.0, 62.0, 50.0, 58.0, 45.0, 52.0, 57.0])   # class 2 the smallest


def test_planted_small_trigger_is_the_one_outlier_of_the_size_statistic():
    z = size_statistics(NATURAL, [[n] for n in NATURAL])["size_z"]
    assert int(np.argmax(z)) == 2 and (np.delete(z, 2) < 2.0).all()
    planted = NATURAL.copy()
    planted[7] = 9.0                                           # a 3x3 patch among natural triggers of ~50 px
    z = size_statistics(planted, [[n] for n in planted])["size_z"]
    assert z[7] > 2 * z[2] and z[7] > 8 and (np.delete(z, [2, 7]) < 2.0).all()


def test_size_statistic_is_scale_free_and_counts_the_restarts_spread():
    one = size_statistics(NATURAL, [[n] for n in NATURAL])
    scaled = size_statistics(10 * NATURAL, [[10 * n] for n in NATURAL])
    np.testing.assert_allclose(one["size_z"], scaled["size_z"], rtol=1e-9)
    np.testing.assert_allclose(one["size_ratio"], scaled["size_ratio"], rtol=1e-9)
    assert one["size_ratio"][2] == pytest.approx(35.0 / np.median(np.delete(NATURAL, 2)))
    # two restarts of class 2 that disagree (35 vs 70 px) make its estimate count for less
    restarts = [[n] for n in NATURAL]
    restarts[2] = [35.0, 70.0]
    spread = size_statistics(NATURAL, restarts)
    assert spread["restart_spread"][2] == pytest.approx(np.std(np.log([35.0, 70.0])))
    assert spread["size_z"][2] < one["size_z"][2]


def test_asymmetry_is_positive_for_a_one_way_trigger_and_near_zero_for_a_natural_feature():
    assert asymmetry([9, 10, 8, 11], [50, 60, 45, 55]) == pytest.approx(np.median(np.log([50 / 9, 60 / 10,
                                                                                           45 / 8, 55 / 11])))
    assert asymmetry([9, 10, 8, 11], [50, 60, 45, 55]) > 1.0
    assert abs(asymmetry([30, 40, 35], [32, 38, 36])) < 0.1


def test_suspects_are_the_largest_size_statistics_above_the_cut():
    cfg = DecisionConfig(suspect_z=2.0, max_suspects=2)
    assert suspects(np.array([0.5, 4.0, 2.5, 3.0]), cfg) == [1, 3]
    assert suspects(np.array([0.5, 1.0, 1.9]), cfg) == []
    assert suspects(np.array([0.5, 2.6, 2.4]), DecisionConfig()) == [1]          # default: the flagging cut


def entries(size_z, asym=None):
    out = [{"label": c, "size_z": z, "size_ratio": 0.5} for c, z in enumerate(size_z)]
    if asym is not None:
        out[int(np.argmax(size_z))]["asymmetry"] = asym
    return out


def test_verdict_combines_size_symmetry_and_maximum_margin():
    cfg = DecisionConfig()   # size z 2.5, asymmetry log 2
    assert decide(entries([0.1, 4.0, 1.0], asym=1.2), None, cfg).keys() == {1}
    assert decide(entries([0.1, 4.0, 1.0], asym=0.1), None, cfg) == {}        # as easy both ways: natural
    assert decide(entries([0.1, 4.0, 1.0], asym=0.5), None, cfg) == {}        # clean MNIST class 2: 1.6x
    assert decide(entries([0.1, 4.0, 1.0]), None, cfg) == {}                  # symmetry not measured
    assert decide(entries([0.1, 4.0, 1.0]), None, DecisionConfig(symmetry=False)).keys() == {1}
    assert decide(entries([0.1, 2.4, 1.0], asym=1.2), None, cfg) == {}
    assert decide(entries([0.1, 4.0, 1.0], asym=1.2), None, DecisionConfig(size_ratio=0.6)).keys() == {1}
    assert decide(entries([0.1, 4.0, 1.0], asym=1.2), None, DecisionConfig(size_ratio=0.3)) == {}   # ratio 0.5
    margin = {"flagged": True, "target": 2, "p_value": 1e-4, "statistics": [1.0, 1.2, 9.0]}
    assert decide(entries([0.1, 2.0, 1.0]), margin, cfg).keys() == {2}
    assert decide(entries([0.1, 2.0, 1.0]), dict(margin, flagged=False), cfg) == {}
    both = decide(entries([0.1, 0.2, 5.0], asym=1.0), margin, cfg)
    assert both.keys() == {2} and len(both[2]) == 2                             # two reasons for one class
