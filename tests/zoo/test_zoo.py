"""The trojan zoo: trigger kinds, poisoning, ground truth on disk."""

import dataclasses

import numpy as np
import pytest

from jaxrisk.data import load_digits
from jaxrisk.errors import InputError
from jaxrisk.zoo import (STAMP_KINDS, TrainConfig, evaluate, load_trigger, make_trigger, poison, save_trigger,
                         train_classifier)
from jaxrisk.zoo.triggers import ALL_TO_ALL
from jaxrisk.zoo.build import meets_bar, zoo_specs


def test_trigger_kinds_have_the_promised_shape():
    shape = (1, 28, 28)
    patch = make_trigger("patch", shape, size=4, location=(2, 3))
    assert patch.mask.sum() == 16 and patch.mask[2:6, 3:7].all() and (patch.pattern == 1).all()
    sparse = make_trigger("sparse", shape, n_pixels=10, seed=1)
    assert sparse.mask.sum() == 10 and set(np.unique(sparse.mask)) == {0.0, 1.0}
    checker = make_trigger("checkerboard", shape, size=4, location=(0, 0))
    assert checker.mask.sum() == 16 and set(np.unique(checker.pattern[0, :4, :4])) == {0.0, 1.0}
    blend = make_trigger("blend", shape, alpha=0.2)
    np.testing.assert_allclose(blend.mask, 0.2)
    x = np.random.default_rng(0).uniform(size=(3, *shape)).astype(np.float32)
    np.testing.assert_allclose(blend.apply(x), 0.8 * x + 0.2 * blend.pattern, rtol=1e-6)
    warp = make_trigger("warp", shape, strength=1.5, seed=3)
    assert warp.mask.sum() == 0 and np.mean(np.hypot(*warp.flow)) == pytest.approx(1.5, rel=1e-5)
    ramp = np.broadcast_to(np.arange(28.0, dtype=np.float32)[None, :], (28, 28))[None, None] / 27
    moved = warp.apply(ramp)[0, 0]                  # a horizontal ramp is read back where the columns moved to
    inner = (slice(4, 24), slice(4, 24))
    np.testing.assert_allclose(moved[inner] * 27, np.clip(np.arange(28) + warp.flow[1], 0, 27)[inner], atol=1e-4)
    still = dataclasses.replace(warp, flow=np.zeros_like(warp.flow))
    np.testing.assert_allclose(still.apply(x), x, atol=1e-6)
    sig = make_trigger("sig", shape, amplitude=0.1, frequency=7)
    columns = np.arange(28)
    np.testing.assert_allclose(sig.apply(np.full((1, *shape), 0.5, np.float32))[0, 0],
                               np.broadcast_to(0.5 + 0.1 * np.sin(2 * np.pi * 7 * columns / 28), (28, 28)), atol=1e-6)
    assert sig.apply(np.ones((1, *shape), np.float32)).max() == 1.0        # clipped to the image range


def test_bad_trigger_requests():
    with pytest.raises(InputError, match="unknown trigger kind"):
        make_trigger("star", (1, 28, 28))
    with pytest.raises(InputError, match="does not fit"):
        make_trigger("patch", (1, 28, 28), size=5, location=(25, 0))
    with pytest.raises(InputError, match="ALL_TO_ALL"):
        make_trigger("patch", (1, 28, 28), target=-2)


def test_poisoning_stamps_and_relabels_only_non_target_images():
    data = load_digits("train")
    trig = make_trigger("patch", data.shape, target=3, size=2)
    poisoned = poison(data, trig, rate=0.1, seed=0)
    changed = np.flatnonzero((poisoned.images != data.images).any(axis=(1, 2, 3)) | (poisoned.labels != data.labels))
    assert len(changed) == round(0.1 * np.sum(data.labels != 3))
    assert (data.labels[changed] != 3).all() and (poisoned.labels[changed] == 3).all()


def test_all_to_all_poisoning_shifts_every_label_by_one():
    data = load_digits("train")
    trig = make_trigger("patch", data.shape, target=ALL_TO_ALL, size=2)
    poisoned = poison(data, trig, rate=0.1, seed=0)
    changed = np.flatnonzero(poisoned.labels != data.labels)
    assert len(changed) == round(0.1 * len(data.labels))                 # every class is a source
    np.testing.assert_array_equal(poisoned.labels[changed], (data.labels[changed] + 1) % 10)
    assert (poisoned.images[changed] != data.images[changed]).any(axis=(1, 2, 3)).all()


def test_trigger_ground_truth_round_trips(tmp_path):
    trig = make_trigger("checkerboard", (1, 28, 28), target=5, size=3, seed=2)
    save_trigger(trig, tmp_path / "t.safetensors")
    again = load_trigger(tmp_path / "t.safetensors")
    assert (again.kind, again.target) == ("checkerboard", 5)
    np.testing.assert_array_equal(again.mask, trig.mask)
    np.testing.assert_array_equal(again.pattern, trig.pattern)
    warp = make_trigger("warp", (1, 28, 28), target=2, seed=4)
    save_trigger(warp, tmp_path / "w.safetensors")
    np.testing.assert_array_equal(load_trigger(tmp_path / "w.safetensors").flow, warp.flow)
    sig = make_trigger("sig", (1, 28, 28), target=ALL_TO_ALL)
    save_trigger(sig, tmp_path / "s.safetensors")
    again = load_trigger(tmp_path / "s.safetensors")
    assert (again.kind, again.target) == ("sig", ALL_TO_ALL)
    np.testing.assert_array_equal(again.signal, sig.signal)


def test_planted_trigger_fires_and_clean_accuracy_holds():
    train, test = load_digits("train"), load_digits("test")
    trig = make_trigger("patch", train.shape, target=3, size=2)
    model = train_classifier(train, TrainConfig(arch="mlp", hidden=(64,), epochs=30, batch_size=32), trig,
                             progress=False)
    info = evaluate(model, test, trig)
    assert info["clean_accuracy"] >= 0.95 and info["attack_success"] >= 0.95


def test_zoo_meets_every_kind_with_every_architecture_and_enforces_its_bar():
    from jaxrisk.zoo.build import ZOO_ARCHS, ZOO_KINDS, spec_trigger

    specs = zoo_specs(24, 16)
    trojaned = [s for s in specs if s["kind"]]
    assert sorted((s["kind"], s["arch"]) for s in trojaned) == sorted(
        (k, a) for k in ZOO_KINDS for a in ZOO_ARCHS)                 # 8 kinds x 3 architectures, once each
    assert sorted(s["arch"] for s in specs if s["kind"] is None) == sorted(ZOO_ARCHS * 5 + ZOO_ARCHS[:1])
    assert set(STAMP_KINDS) < set(ZOO_KINDS)
    shape = (1, 28, 28)
    large = spec_trigger(next(s for s in trojaned if s["kind"] == "patch_large"), shape)
    assert large.kind == "patch" and large.mask.sum() == 64
    shift = spec_trigger(next(s for s in trojaned if s["kind"] == "all_to_all"), shape)
    assert shift.target == ALL_TO_ALL and shift.mask.sum() == 16
    assert spec_trigger(specs[-1], shape) is None
    with pytest.raises(InputError, match="zoo trigger kinds"):
        zoo_specs(2, 0, kinds=("patch", "stars"))
    with pytest.raises(InputError, match="zoo architectures"):
        zoo_specs(2, 0, archs=("vgg",))
    assert meets_bar({"clean_accuracy": 0.985, "attack_success": 0.96})
    assert not meets_bar({"clean_accuracy": 0.975, "attack_success": 0.99})
    assert not meets_bar({"clean_accuracy": 0.99, "attack_success": 0.9})
