"""The promotion rule, McNemar's exact test and the registry file under concurrent writers."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from tasks.config import PromoteConfig
from tasks.runs.registry import Registry, RegistryError, decide, mcnemar_exact
from tasks.store.artifacts import write_manifest

CFG = PromoteConfig()
WRONG_10 = np.zeros(10, bool)  # a softmax baseline wrong on every example, which any useful challenger beats


def rule(champion: np.ndarray | None, challenger: np.ndarray, cfg: PromoteConfig = CFG, passed: bool = True):
    """The promotion rule against a softmax baseline that is wrong everywhere, so the gate never decides."""
    return decide(champion, challenger, cfg, passed, baseline_correct=np.zeros_like(challenger, dtype=bool))


def first_model(passed: bool = True):
    """The decision for a first model that is right on all of 10 examples."""
    return decide(None, np.ones(10, bool), CFG, passed, baseline_correct=WRONG_10)


def paired(n: int, b: int, c: int, both: int) -> tuple[np.ndarray, np.ndarray]:
    """Correctness arrays of (champion, challenger) with b champion-only and c challenger-only hits."""
    champion = np.zeros(n, bool)
    challenger = np.zeros(n, bool)
    champion[:both + b] = True
    challenger[:both] = True
    challenger[both + b:both + b + c] = True
    return champion, challenger


def candidate(name: str, accuracy: float = 0.95) -> dict:
    return {"key": name * 8, "model_path": f"finetune/{name * 8}/pretrained.keras", "accuracy": accuracy,
            "n": 1000, "data_fingerprint": "fp", "evaluate_key": f"eval-{name}"}


def store_model(root: Path, name: str) -> Path:
    """A model file inside a finetune artifact with its manifest, as the store publishes it."""
    directory = Path(root) / "finetune" / (name * 8)
    directory.mkdir(parents=True)
    (directory / "pretrained.keras").write_bytes(f"model {name}".encode())
    write_manifest(directory, key=directory.name)
    return directory / "pretrained.keras"


@pytest.mark.parametrize(("b", "c", "expected"), [
    (0, 6, 0.03125),             # 2 * 1/64
    (1, 9, 0.021484375),         # 2 * (1 + 10) / 1024
    (5, 5, 1.0),                 # tails overlap: capped at 1
    (0, 0, 1.0),                 # no disagreement, no evidence
    (3, 0, 0.25),                # 2 * 1/8, symmetric in b and c
])
def test_mcnemar_matches_hand_computed_values(b, c, expected):
    assert mcnemar_exact(b, c) == pytest.approx(expected, abs=1e-15)
    assert mcnemar_exact(c, b) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(("b", "c"), [(2, 11), (7, 3), (12, 12), (0, 17)])
def test_mcnemar_matches_enumeration_of_all_outcomes(b, c):
    # Independent definition: total probability of outcomes no more likely than the observed one.
    n = b + c
    probs = [math.comb(n, k) / 2**n for k in range(n + 1)]
    expected = sum(p for p in probs if p <= probs[b] * (1 + 1e-12))
    assert mcnemar_exact(b, c) == pytest.approx(min(1.0, expected))


def test_mcnemar_handles_a_full_test_set_without_overflow():
    assert 0 < mcnemar_exact(4000, 4300) < 0.05


def test_first_model_is_promoted(store_root):
    _, challenger = paired(1000, 0, 0, 950)
    decision = rule(None, challenger)
    assert decision.promote and "first model" in decision.reason
    reg = Registry(store_root)
    reg.record_decision(candidate("a"), lambda _: decision, "run-1")
    assert reg.champion()["key"] == "a" * 8
    assert reg.champion()["metrics"] == {"accuracy": 0.95, "n": 1000}
    assert reg.champion()["by"] == "run-1"
    on_disk = json.loads((store_root / "registry" / "mnist.json").read_text())
    assert on_disk["champion"]["key"] == "a" * 8 and len(on_disk["events"]) == 1


def test_worse_challenger_is_not_promoted():
    champion, challenger = paired(1000, 30, 20, 920)
    decision = rule(champion, challenger)
    assert not decision.promote
    assert (decision.b, decision.c) == (30, 20)
    assert decision.champion_accuracy == pytest.approx(0.95) and decision.challenger_accuracy == pytest.approx(0.94)
    assert "-1.00 pts" in decision.reason and "champion kept" in decision.reason


def test_statistically_indistinguishable_gain_is_not_promoted():
    champion, challenger = paired(1000, 10, 13, 930)
    decision = rule(champion, challenger)
    assert decision.challenger_accuracy > decision.champion_accuracy
    assert decision.p_value == pytest.approx(mcnemar_exact(10, 13)) and decision.p_value >= CFG.alpha
    assert not decision.promote
    assert "+0.30 pts" in decision.reason and ">= 0.05" in decision.reason


def test_clearly_better_challenger_is_promoted():
    champion, challenger = paired(1000, 2, 30, 930)
    decision = rule(champion, challenger)
    assert decision.promote
    assert decision.p_value < 1e-6
    assert decision.reason.startswith("challenger 96.00 % vs champion 93.20 % (+2.80 pts), McNemar exact p=")
    assert decision.reason.endswith("< 0.05: promoted")


def test_gain_below_required_minimum_is_not_promoted():
    champion, challenger = paired(1000, 2, 30, 930)
    decision = rule(champion, challenger, PromoteConfig(min_accuracy_gain=0.05))
    assert not decision.promote and ">= 5.00 pts" in decision.reason


@pytest.mark.parametrize("first", [True, False])
def test_failed_validation_never_promotes(first):
    champion, challenger = paired(1000, 0, 60, 900)
    decision = rule(None if first else champion, challenger, passed=False)
    assert not decision.promote and "validation failed" in decision.reason


def test_different_test_sets_are_rejected():
    with pytest.raises(ValueError, match="different test sets"):
        decide(np.ones(100, bool), np.ones(99, bool), CFG, validation_passed=True, baseline_correct=np.zeros(99, bool))


def test_rejected_decision_is_logged_but_keeps_the_champion(store_root):
    reg = Registry(store_root)
    reg.record_decision(candidate("a"), lambda _: first_model(), "run-1")
    champion, challenger = paired(1000, 30, 20, 920)
    event = reg.record_decision(candidate("b", 0.94), lambda _: rule(champion, challenger), "run-2")
    assert event["event"] == "reject" and event["decision"]["b"] == 30
    assert reg.champion()["key"] == "a" * 8
    assert [e["event"] for e in reg.events()] == ["promote", "reject"]
    assert set(reg.candidates()) == {"a" * 8, "b" * 8}


def test_manual_promote_and_rollback_are_recorded(store_root):
    reg = Registry(store_root)
    for name in "ac":
        store_model(store_root, name)
    reg.record_decision(candidate("a"), lambda _: first_model(), "run-1")
    champion, challenger = paired(1000, 2, 30, 930)
    reg.record_decision(candidate("b"), lambda _: rule(champion, challenger), "run-2")
    reg.promote("c" * 8, candidate("c"), by="alice", reason="hotfix model")
    assert reg.champion()["key"] == "c" * 8 and reg.champion()["reason"] == "hotfix model"

    assert reg.rollback(by="bob")["key"] == "b" * 8
    assert reg.rollback(by="bob")["key"] == "a" * 8
    assert reg.champion()["by"] == "bob" and "rollback from bbbbbbbb" in reg.champion()["reason"]
    assert [e["event"] for e in reg.events()] == ["promote", "promote", "manual", "rollback", "rollback"]
    assert reg.champion_model() == Path(store_root).resolve() / "finetune" / ("a" * 8) / "pretrained.keras"


def test_manual_promote_of_an_evaluated_model_by_key_alone(store_root):
    reg = Registry(store_root)
    store_model(store_root, "a")
    reg.record_decision(candidate("a"), lambda _: first_model(passed=False), "run-1")
    assert reg.champion() is None
    reg.promote("a" * 8, None, by="alice", reason="validation was a false alarm")
    assert reg.champion()["key"] == "a" * 8
    with pytest.raises(RegistryError, match="no evaluated model with key zzz"):
        reg.promote("zzz", None, by="alice", reason="typo")


def test_rollback_without_previous_champion_errors_clearly(store_root):
    reg = Registry(store_root)
    with pytest.raises(RegistryError, match="has no champion to roll back from"):
        reg.rollback(by="bob")
    reg.record_decision(candidate("a"), lambda _: first_model(), "run-1")
    with pytest.raises(RegistryError, match="no previous champion \\(only champion aaaaaaaa"):
        reg.rollback(by="bob")
    assert reg.champion()["key"] == "a" * 8 and len(reg.events()) == 1


def test_absolute_model_path_inside_the_store_is_stored_relative(store_root):
    reg = Registry(store_root)
    absolute = dict(candidate("a"), model_path=str(Path(store_root).resolve() / "finetune" / "m.keras"))
    reg.record_decision(absolute, lambda _: first_model(), None)
    assert reg.champion()["model_path"] == "finetune/m.keras"


def _record_many(root: str, worker: int, count: int) -> None:
    reg = Registry(root)
    for i in range(count):
        champion, challenger = paired(200, i % 3, (i + worker) % 5, 150)
        decision = rule(champion, challenger)
        reg.record_decision(candidate(f"{worker}-{i}-"), lambda _, d=decision: d, f"w{worker}")


def test_concurrent_writers_lose_no_registry_event(store_root):
    Registry(store_root).record_decision(candidate("a"), lambda _: first_model(), "seed")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(str(store_root), w, 10)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    events = Registry(store_root).events()
    assert len(events) == 41
    by_worker = {k: len(list(g)) for k, g in itertools.groupby(sorted(e["by"] for e in events[1:]))}
    assert by_worker == {"w0": 10, "w1": 10, "w2": 10, "w3": 10}


def test_judge_sees_the_champion_at_decision_time(store_root):
    reg = Registry(store_root)
    seen = []

    def judge(champion):
        seen.append(None if champion is None else champion["key"])
        return first_model()

    reg.record_decision(candidate("a"), judge, "run-1")
    reg.record_decision(candidate("b"), judge, "run-2")
    assert seen == [None, "a" * 8]


def test_each_dataset_has_its_own_champion(store_root):
    Registry(store_root, "mnist").record_decision(candidate("a"), lambda _: first_model(),
                                                  "run-1")
    assert Registry(store_root, "fashion-mnist").champion() is None
    assert Registry(store_root, "mnist").champion()["key"] == "a" * 8


# --- the quality gate ---------------------------------------------------------------------------------------------

def test_first_model_no_better_than_its_softmax_baseline_is_refused():
    """The 5-training-image case: 9.25 % against a softmax baseline of 9.15 % on 2,000 images."""
    baseline, challenger = paired(2000, 40, 42, 143)
    assert (challenger.mean(), baseline.mean()) == (0.0925, 0.0915)
    decision = decide(None, challenger, CFG, True, baseline_correct=baseline)
    assert not decision.promote and decision.baseline_accuracy == 0.0915
    assert decision.reason == ("challenger 9.25 % is not significantly better than its run's softmax baseline 9.15 % "
                               f"(McNemar exact p={mcnemar_exact(40, 42):.3g}): not promoted")


def test_challenger_below_its_baseline_is_refused_even_against_a_weak_champion():
    baseline, challenger = paired(1000, 50, 10, 800)
    champion = np.zeros(1000, bool)
    decision = decide(champion, challenger, CFG, True, baseline_correct=baseline)
    assert not decision.promote and "does not beat its run's softmax baseline 85.00 %" in decision.reason


def test_minimum_accuracy_applies_to_the_first_model():
    challenger = np.zeros(1000, bool)
    challenger[:400] = True
    decision = decide(None, challenger, CFG, True, baseline_correct=np.zeros(1000, bool))
    assert not decision.promote and "below the minimum accuracy 50.00 % (promote.min_accuracy)" in decision.reason
    assert decide(None, challenger, PromoteConfig(min_accuracy=0.4), True,
                  baseline_correct=np.zeros(1000, bool)).promote


def test_a_run_without_a_softmax_baseline_is_never_promoted():
    decision = decide(None, np.ones(10, bool), CFG, True, baseline_correct=None)
    assert not decision.promote and "no softmax baseline" in decision.reason


# --- judged once, verified models, damaged registry files ----------------------------------------------------------

def test_an_evaluation_is_judged_once(store_root):
    reg = Registry(store_root)
    assert not reg.judged("eval-a")
    assert reg.record_decision(candidate("a"), lambda _: first_model(), "run-1")["event"] == "promote"
    assert reg.judged("eval-a")
    assert reg.record_decision(candidate("a"), lambda _: pytest.fail("judged twice"), "run-2") is None
    assert reg.record_decision(candidate("b"), lambda _: None, "run-3") is None  # a judge may defer
    assert not reg.judged("eval-b") and len(reg.events()) == 1


@pytest.mark.parametrize("damage", ["size", "bytes", "manifest"])
def test_a_damaged_champion_model_is_never_handed_out(store_root, damage):
    path = store_model(store_root, "a")
    reg = Registry(store_root)
    reg.record_decision(candidate("a"), lambda _: first_model(), "run-1")
    assert reg.champion_model() == path.resolve()
    if damage == "size":
        path.write_bytes(b"another model, longer")
    elif damage == "bytes":
        path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))
    else:
        (path.parent / "manifest.json").unlink()
    with pytest.raises(RegistryError) as info:
        reg.champion_model()
    message = str(info.value)
    assert str(path.resolve()) in message and "mnist-ae rollback" in message and "\n" not in message
    with pytest.raises(RegistryError, match="cannot promote aaaaaaaa: .* fails verification"):
        reg.promote("a" * 8, candidate("a"), by="alice", reason="try")


CORRUPT = {
    "truncated": '{"champion": null, "hist',
    "empty object": "{}",
    "champion not an object": '{"champion": 5, "events": []}',
    "event without candidate": '{"champion": null, "events": [{"event": "promote"}]}',
    "not text": "\udcff",
}


@pytest.mark.parametrize("text", CORRUPT.values(), ids=CORRUPT.keys())
def test_a_damaged_registry_file_is_named_and_left_untouched(store_root, text):
    path = store_root / "registry" / "mnist.json"
    path.parent.mkdir(parents=True)
    raw = text.encode("utf-8", "surrogateescape")
    path.write_bytes(raw)
    reg = Registry(store_root)
    for action in (reg.champion, lambda: reg.rollback("bob"),
                   lambda: reg.record_decision(candidate("a"), lambda _: first_model(), "run-1")):
        with pytest.raises(RegistryError) as info:
            action()
        assert str(path.resolve()) in str(info.value) and "left untouched" in str(info.value)
    assert path.read_bytes() == raw and sorted(p.name for p in path.parent.iterdir()) == ["mnist.json"]
