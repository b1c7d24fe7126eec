"""The scan's decision statistics on cases whose answers are known, and the verdict built from them."""

import numpy as np
import pytest

from jaxrisk.scan.config import DecisionConfig
from jaxrisk.scan.decide import (asymmetry, decide, reference_statistics, size_statistics, student_t_tail,
                                 suspects)

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


def clean_references(n: int = 5, seed: int = 0, jitter: float = 0.1) -> np.ndarray:
    """n clean models of one architecture: the natural class 2 small in each, each model's scale drawn
    from 0.5-2x and its classes' norms jittered by `jitter` (log-normal)."""
    rng = np.random.default_rng(seed)
    return NATURAL * rng.uniform(0.5, 2.0, (n, 1)) * rng.lognormal(0.0, jitter, (n, len(NATURAL)))


def test_reference_statistic_clears_the_natural_class_and_finds_the_planted_one():
    refs = clean_references()
    clean = NATURAL * 3.0                                      # another clean model, on a different scale
    against = reference_statistics(clean, refs)
    assert abs(against["reference_z"][2]) < 2 and (against["reference_p"] > 0.05).all()   # class 2: natural
    assert size_statistics(clean, [[n] for n in clean])["size_z"][2] > 2.5   # which the size statistic flags
    planted = clean.copy()
    planted[5] = clean[5] / 4                                  # a planted trigger 4x smaller than class 5's natural
    against = reference_statistics(planted, refs)
    assert int(np.argmax(against["reference_z"])) == 5 and against["reference_z"][5] > 6
    assert against["reference_p"][5] < 1e-3 and (np.delete(against["reference_p"], 5) > 0.05).all()
    assert against["reference_ratio"][5] == pytest.approx(0.25, rel=0.2)


def test_reference_statistic_is_in_units_of_the_references_spread():
    """The same planted trigger counts for less against references that disagree more among themselves,
    and the same z for less against fewer references (Student's t: wider tails with fewer degrees of freedom)."""
    planted = NATURAL.copy()
    planted[5] /= 3
    narrow = reference_statistics(planted, clean_references(jitter=0.1))
    wide = reference_statistics(planted, clean_references(jitter=0.3))
    assert narrow["reference_z"][5] > 3 and 0 < wide["reference_z"][5] < narrow["reference_z"][5] / 2
    assert wide["reference_p"][5] > narrow["reference_p"][5]
    assert student_t_tail(3.0, 10) > student_t_tail(3.0, 40) > student_t_tail(3.0, 10_000)


def test_student_t_tail_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    t = np.array([-2.0, 0.0, 0.5, 3.0, 6.0])
    for dof in (3, 10, 45):
        np.testing.assert_allclose(student_t_tail(t, dof), stats.t.sf(t, dof), rtol=1e-4, atol=1e-7)


def test_verdict_with_a_reference_ignores_size_and_symmetry():
    cfg = DecisionConfig()
    natural = {"label": 2, "size_z": 4.0, "size_ratio": 0.6, "asymmetry": 1.0, "reference_z": 0.4,
               "reference_p": 1.0, "reference_ratio": 0.95}
    planted = {"label": 5, "size_z": 1.0, "size_ratio": 0.8, "reference_z": 7.0, "reference_p": 1e-5,
               "reference_ratio": 0.3}
    reasons = decide([natural, planted], None, cfg)
    assert list(reasons) == [5] and "reference z 7.0" in reasons[5][0]
    margin = {"flagged": True, "target": 2, "p_value": 1e-4, "statistics": [0, 0, 80.0]}
    assert sorted(decide([natural, planted], margin, cfg)) == [2, 5]   # MM-BD still speaks
