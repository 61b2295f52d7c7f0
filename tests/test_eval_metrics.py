"""Evaluation: the pure metrics on hand-made cases (expected values worked out by hand, in the comments),
the scorer against a plain Hugging Face forward, and `aft-fast eval` end to end, in one process and
sharded over two DeepSpeed processes (the same results)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aft_fast.data.candidates import Candidate, CandidateGroup, read_candidates, write_candidates
from aft_fast.data.collate import encode_chain, encode_prompt
from aft_fast.data.synthetic import generate_problems
from aft_fast.eval.metrics import (
    assessment_accuracy,
    form_shares,
    majority_vote,
    misranking_by_form,
    pair_wins,
    perplexity,
    rerank,
    spread,
)
from tests._train_support import ROOT, check, clean_env, launch, make_assets

# --- majority vote (self-consistency) ---------------------------------------------------------------------


def test_vote_takes_the_most_frequent_answer():
    assert majority_vote(["3", "5", "3", "7"]) == "3"


def test_vote_tie_goes_to_the_answer_sampled_first():
    assert majority_vote(["5", "3", "3", "5"]) == "5"
    assert majority_vote(["3", "5", "5", "3"]) == "3"
    assert majority_vote(["9", "4", "1"]) == "9"  # all tied at one vote


def test_vote_ignores_unreadable_answers():
    # Two samples without an answer do not outvote one readable answer.
    assert majority_vote([None, None, "7"]) == "7"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


# --- re-ranking -------------------------------------------------------------------------------------------


def test_rerank_picks_the_highest_score():
    assert rerank([-1.0, -0.5, -2.0], ["a", "b", "c"]) == "b"


def test_rerank_tie_goes_to_the_earlier_candidate():
    assert rerank([-2.0, -0.5, -0.5], ["a", "b", "c"]) == "b"


def test_rerank_edge_cases():
    assert rerank([-0.1, -3.0], [None, "4"]) is None  # the best chain has no readable answer
    assert rerank([], []) is None
    with pytest.raises(ValueError):
        rerank([-1.0], ["a", "b"])


# --- pairs and assessment accuracy ------------------------------------------------------------------------


def test_pair_wins_binary():
    # Positive -1 above both negatives (-2, -3): 2 of 2 pairs.
    assert pair_wins([-1.0, -2.0, -3.0], [1, 0, 0]) == (2.0, 2)
    # Positive -2.5 beats -3 but not -2: 1 of 2.
    assert pair_wins([-2.0, -2.5, -3.0], [0, 1, 0]) == (1.0, 2)
    # Booleans work as labels.
    assert pair_wins([-1.0, -2.0], [True, False]) == (1.0, 1)


def test_pair_wins_tie_counts_half():
    assert pair_wins([-1.0, -1.0], [1, 0]) == (0.5, 1)
    assert pair_wins([-1.0, -1.0, -1.0], [1, 0, 0]) == (1.0, 2)


def test_pair_wins_without_negatives_or_positives_has_no_pair():
    assert pair_wins([-1.0, -2.0], [1, 1]) == (0.0, 0)
    assert pair_wins([-1.0, -2.0], [0, 0]) == (0.0, 0)
    assert pair_wins([], []) == (0.0, 0)


def test_pair_wins_ranks():
    # Ranks 2 > 1 > 0 give pairs (0,1), (0,2), (1,2); scores are in reverse order: no pair is right.
    assert pair_wins([-3.0, -2.0, -1.0], [2, 1, 0]) == (0.0, 3)
    # Equal ranks form no pair: only (0,1) and (0,2) exist, both right.
    assert pair_wins([-1.0, -2.0, -3.0], [2, 1, 1]) == (2.0, 2)


def test_assessment_accuracy_pools_pairs_over_questions():
    groups = [
        ([-1.0, -2.0, -3.0], [1, 0, 0]),  # 2 of 2
        ([-2.0, -1.0], [1, 0]),  # 0 of 1
        ([-1.0, -2.0], [1, 1]),  # only positives: skipped
        ([-1.0], [0]),  # only a negative: skipped
        ([], []),  # no candidates: skipped
    ]
    a = assessment_accuracy(groups)
    # Pooled: 2 of 3 pairs (a mean over questions would give (1 + 0) / 2 = 0.5).
    assert a.accuracy == pytest.approx(2 / 3)
    assert (a.wins, a.pairs, a.questions) == (2.0, 3, 2)


def test_assessment_accuracy_ties_and_undefined():
    assert assessment_accuracy([([-1.0, -1.0, -1.0], [1, 0, 0])]).accuracy == 0.5
    none = assessment_accuracy([([-1.0, -2.0], [1, 1]), ([], [])])
    assert none.accuracy is None and none.pairs == 0 and none.questions == 0


# --- perplexity and the spread over seeds -----------------------------------------------------------------


def test_perplexity_is_exp_of_the_token_mean_nll():
    # 1 token with NLL 1 and 3 tokens with NLL 6: exp(7 / 4), not the mean of exp(1) and exp(2).
    assert perplexity([1.0, 6.0], [1, 3]) == pytest.approx(math.exp(1.75))
    assert perplexity([0.0], [5]) == 1.0
    assert perplexity([], []) is None
    assert perplexity([0.0], [0]) is None


def test_spread():
    s = spread([0.3, 0.5, 0.4])
    assert s.mean == pytest.approx(0.4) and s.std == pytest.approx(0.1)
    assert (s.min, s.max, s.n) == (0.3, 0.5, 3)
    assert spread([0.7]).std == 0.0


# --- the scorer and the evaluation loop on a real (tiny, untrained) model ---------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("eval_assets"), n_groups=6)


def _plain_logprob(model, tokenizer, question: str, chain: str) -> tuple[float, int]:
    """Summed log-prob of the chain (eos included) after the prompt, from the full logits."""
    prompt, ids = encode_prompt(tokenizer, question), encode_chain(tokenizer, chain)
    x = torch.tensor([prompt + ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits.double(), dim=-1)[0]
    total = sum(logp[len(prompt) + j - 1, t].item() for j, t in enumerate(ids))
    return total, len(ids)


def test_score_groups_matches_a_plain_forward(assets):
    from aft_fast.eval.evaluate import score_groups
    from aft_fast.models.loading import load_replica, load_tokenizer

    tok = load_tokenizer(assets["tokenizer"])
    model = load_replica(assets["model"], torch.device("cpu"), torch.float32)
    groups = read_candidates(assets["candidates"])[:3]
    groups.append(CandidateGroup("empty", "What is 2 + 2?", "4", "number", None, []))  # nothing to score
    scored = score_groups(model, tok, groups, batch_size=2, progress=False)
    assert scored[-1].scores == [] and scored[-1].ref_tokens == 0
    for g, s in zip(groups[:3], scored[:3], strict=True):
        assert len(s.scores) == len(g.candidates)
        for c, score in zip(g.candidates, s.scores, strict=True):
            total, n = _plain_logprob(model, tok, g.question, c.text)
            assert score == pytest.approx(total / n, abs=1e-4)
        total, n = _plain_logprob(model, tok, g.question, g.reference)
        assert s.ref_tokens == n and s.ref_nll == pytest.approx(-total, rel=1e-4)


def test_reference_logps_are_the_scored_sums(assets):
    """The sample stage's DPO reference (each candidate's summed log-prob) is score_groups' scoring: the
    plain forward's sum, and score times token count."""
    from aft_fast.eval.evaluate import score_groups
    from aft_fast.models.loading import load_replica, load_tokenizer
    from aft_fast.train.sample import reference_logps

    tok = load_tokenizer(assets["tokenizer"])
    model = load_replica(assets["model"], torch.device("cpu"), torch.float32)
    groups = read_candidates(assets["candidates"])[:3]
    with_ref = reference_logps(model, tok, groups, max_length=256, batch_size=2, progress=False)
    scored = score_groups(model, tok, groups, batch_size=2, with_reference=False, progress=False)
    for g, r, s in zip(groups, with_ref, scored, strict=True):
        assert [c.text for c in r.candidates] == [c.text for c in g.candidates]
        for c, score in zip(r.candidates, s.scores, strict=True):
            total, n = _plain_logprob(model, tok, g.question, c.text)
            assert c.ref_logp == pytest.approx(total, abs=1e-3) and c.ref_logp == pytest.approx(score * n)


def test_evaluate_records_agree_with_the_summary(assets):
    from aft_fast.eval.evaluate import evaluate
    from aft_fast.models.loading import load_replica, load_tokenizer

    tok = load_tokenizer(assets["tokenizer"])
    model = load_replica(assets["model"], torch.device("cpu"), torch.float32)
    examples = generate_problems(5, seed=3)
    # A fixed set with known labels: the reference (right) and a copy with a wrong final answer.
    fixed = []
    for e in examples[:3]:
        body = e.reference[: e.reference.rfind("#### ")]
        fixed.append(
            CandidateGroup.from_example(
                e,
                [
                    Candidate(e.reference, correct=True),
                    Candidate(f"{body}#### {int(e.gold) + 1}", correct=False),
                ],
            )
        )
    res = evaluate(
        model, tok, examples, samples=3, max_new_tokens=12, batch_size=2, fixed=fixed, progress=False
    )
    s, recs = res.summary, res.records
    assert s["questions"] == 5 and len(recs) == 5
    assert s["eval/accuracy"] == sum(r["correct"] for r in recs) / 5
    assert s["eval/self_consistency"] == sum(r["vote_correct"] for r in recs) / 5
    assert all(len(r["votes"]) == 3 and 1 <= len(r["candidates"]) <= 3 for r in recs)
    nll, tokens = sum(r["ref_nll"] for r in recs), sum(r["ref_tokens"] for r in recs)
    assert tokens > 0 and s["eval/perplexity"] == pytest.approx(math.exp(nll / tokens))
    # The fixed set: 3 questions, one pair each, scored as the plain forward scores them.
    assert s["eval/fixed_assess_pairs"] == 3 and s["eval/fixed_assess_questions"] == 3
    wins = 0.0
    for g in fixed:
        right, wrong = (_plain_logprob(model, tok, g.question, c.text) for c in g.candidates)
        wins += 1.0 if right[0] / right[1] > wrong[0] / wrong[1] else 0.0
    assert s["eval/fixed_assess_acc"] == pytest.approx(wins / 3)


# --- assessment misalignment by form (the pilot study) --------------------------------------------------


def test_misranking_by_form_hand_made():
    groups = [
        # Reference form "a". Right -1.0 ("a", same) beats both wrongs: 2 same pairs, 0 misranked. Right -2.0
        # ("b", other) is below wrong -1.5: 2 other pairs, 1 misranked.
        ([-1.0, -2.0, -1.5, -3.0], [1, 1, 0, 0], ["a", "b", "a", "a"], "a"),
        # Reference form "b". Right -1.0 (unrecognised: other) ties wrong -1.0: half. Right -0.5 ("b", same)
        # beats it. 1 same pair (0), 1 other pair (0.5).
        ([-1.0, -1.0, -0.5], [1, 0, 1], [None, "a", "b"], "b"),
        # No reference form: not counted, although its pair is misranked.
        ([-1.0, -2.0], [0, 1], ["a", "a"], None),
    ]
    m = misranking_by_form(groups)
    assert (m.same_pairs, m.other_pairs) == (3, 3)
    assert m.same_form == pytest.approx(0.0) and m.other_form == pytest.approx(1.5 / 3)
    none = misranking_by_form([([-1.0, -2.0], [1, 1], ["a", "b"], "a")])
    assert none.same_form is None and none.other_form is None and none.same_pairs == none.other_pairs == 0
    with pytest.raises(ValueError, match="2 scores, 2 labels, 1 forms"):
        misranking_by_form([([-1.0, -2.0], [1, 0], ["a"], "a")])


def test_form_shares():
    shares = form_shares(["a", None, "a", "b"], ["a", "b", "c"])
    assert shares == {"a": 0.5, "b": 0.25, "c": 0.0, "unrecognised": 0.25}
    assert form_shares([], ["a"]) == {}


# start 2; +12, +4, +3; answer 21.
SYN_Q = (
    "Sam has 2 cards. He buys 12 more. He finds 4 more. He finds 3 more. How many cards does Sam have now?"
)
SYN_RUN = (
    "Sam has 2 cards.\nHe buys 12 more, so he has 2 + 12 = 14.\nHe finds 4 more, so he has 14 + 4 = 18.\n"
    "He finds 3 more, so he has 18 + 3 = 21.\n#### 21"
)
SYN_NET = "Sam has 2 cards.\nHis cards change by 12 + 4 + 3 = 19.\nSo he has 2 + 19 = 21.\n#### 21"
SYN_CANCEL = SYN_RUN.replace("2 + 12 = 14", "2 + 12 = 13").replace("14 + 4 = 18", "13 + 4 = 18")
SYN_WRONG = SYN_RUN.replace("18 + 3 = 21.\n#### 21", "18 + 3 = 22.\n#### 22")


@pytest.mark.parametrize("stored", [True, False])
def test_form_assessment_hand_made(stored):
    from aft_fast.data.candidates import label_candidates
    from aft_fast.eval.evaluate import Scored, form_assessment, form_scores

    texts = [SYN_RUN, SYN_NET, SYN_CANCEL, SYN_WRONG]
    group = CandidateGroup("s", SYN_Q, "21", "number", SYN_RUN, [])  # the reference: a running total
    if stored:  # the fields the sample stage stores
        group = label_candidates(group, texts)
    else:  # an older file: only "correct"; chain and form are worked out again
        group.candidates = [Candidate(t, correct=t != SYN_WRONG) for t in texts]
    scored = [Scored([-0.1, -0.5, -0.3, -0.2])]
    out = form_assessment([group], scored)
    # Answer rule: right RUN (same form, -0.1) beats WRONG (-0.2); right CANCEL (running total: same form,
    # -0.3) is below it; right NET (other form, -0.5) is below it.
    assert (out["misranked_same_form_pairs"], out["misranked_other_form_pairs"]) == (2, 1)
    assert out["misranked_same_form"] == pytest.approx(0.5) and out["misranked_other_form"] == pytest.approx(
        1.0
    )
    # Verified rule: CANCEL is wrong now. RUN beats both wrongs (0 of 2); NET is below both (2 of 2).
    assert out["misranked_same_form_verified"] == pytest.approx(0.0)
    assert out["misranked_other_form_verified"] == pytest.approx(1.0)
    assert (out["assess_acc_verified"], out["assess_pairs_verified"]) == (pytest.approx(0.5), 4)
    assert out["sample_form_running_total"] == 0.75 and out["sample_form_net_change"] == 0.25
    assert out["sample_form_gains_losses"] == 0.0 and out["sample_form_unrecognised"] == 0.0
    items = form_scores([group], scored)
    assert items == [
        (-0.1, True, "running_total", True),
        (-0.5, True, "net_change", False),
        (-0.3, True, "running_total", True),
        (-0.2, False, "running_total", True),
    ]
    # GSM8K-style data: its chains are checked step by step (verified assessment), but nothing by form.
    other = CandidateGroup(
        "o", "What is 2 + 2?", "4", "number", "#### 4", [Candidate("#### 4", correct=True)]
    )
    out = form_assessment([other], [Scored([-0.1])])
    assert out == {"assess_acc_verified": None, "assess_pairs_verified": 0}  # one candidate: no pair
    assert form_scores([other], [Scored([-0.1])]) == []
    # Multiple choice: no chain checker, nothing at all.
    choice = CandidateGroup(
        "c", "Which? \nAnswer Choices: (A) 1 (B) 2", "B", "option", None, [Candidate("B", correct=True)]
    )
    assert form_assessment([choice], [Scored([-0.1])]) == {}


def test_plot_scores_by_form(tmp_path):
    from aft_fast.data.chains import FORMS
    from aft_fast.eval.plots import plot_scores_by_form

    items = [
        (-0.1, True, "running_total", True),
        (-0.4, True, "net_change", False),
        (-0.2, False, None, False),
    ]
    path = plot_scores_by_form(items, FORMS, tmp_path / "by_form.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))


def test_evaluate_by_form_on_a_fixed_set(assets):
    from aft_fast.data.chains import check_chain
    from aft_fast.eval.evaluate import evaluate
    from aft_fast.models.loading import load_replica, load_tokenizer

    tok = load_tokenizer(assets["tokenizer"])
    model = load_replica(assets["model"], torch.device("cpu"), torch.float32)
    forms, v1 = generate_problems(40, seed=3), generate_problems(40, seed=3, task="v1")
    # Questions whose reference is not a running total: the v1 chain is a right chain of another form.
    picked = [(f, o) for f, o in zip(forms, v1, strict=True) if f.reference != o.reference][:3]
    assert len(picked) == 3
    fixed, examples = [], [f for f, _ in picked]
    for e, old in picked:
        body = e.reference[: e.reference.rfind("#### ")]
        texts = [e.reference, old.reference, f"{body}#### {int(e.gold) + 1}"]
        fixed.append(CandidateGroup.from_example(e, [Candidate(t) for t in texts]))
        fixed[-1].candidates[0].correct, fixed[-1].candidates[1].correct = True, True
        fixed[-1].candidates[2].correct = False
    res = evaluate(
        model, tok, examples, samples=2, max_new_tokens=12, batch_size=2, fixed=fixed, progress=False
    )
    s, recs = res.summary, res.records
    # Chain accuracy: greedy answer right and chain checked right, from the records.
    want = sum(
        r["correct"] and check_chain(e.question, r["output"]).ok for r, e in zip(recs, examples, strict=True)
    )
    assert s["eval/chain_accuracy"] == want / 3
    assert all(
        r["reference_form"] == check_chain(e.question, e.reference).form
        for r, e in zip(recs, examples, strict=True)
    )
    # The fixed set: per question a same-form pair (reference vs wrong), an other-form pair (v1 vs wrong).
    assert (s["eval/fixed_misranked_same_form_pairs"], s["eval/fixed_misranked_other_form_pairs"]) == (3, 3)
    same = other = 0.0
    for g in fixed:
        ref, old, wrong = (_plain_logprob(model, tok, g.question, c.text) for c in g.candidates)
        w = wrong[0] / wrong[1]
        same += 1.0 if w > ref[0] / ref[1] else 0.0
        other += 1.0 if w > old[0] / old[1] else 0.0
    assert s["eval/fixed_misranked_same_form"] == pytest.approx(same / 3)
    assert s["eval/fixed_misranked_other_form"] == pytest.approx(other / 3)
    for key in ("eval/accuracy", "eval/self_consistency", "eval/rerank_accuracy", "eval/assess_acc"):
        assert key in s, key


# --- `aft-fast eval` / `train.py --stage eval`: files, and the same results on 1 and 2 processes -----------


def _test_file(path: Path, n: int) -> Path:
    path.write_text(
        "".join(
            json.dumps({"question": p.question, "answer": p.reference}) + "\n"
            for p in generate_problems(n, seed=9)
        )
    )
    return path


@pytest.mark.distributed
def test_eval_stage_one_and_two_processes_agree(assets, tmp_path):
    test = _test_file(tmp_path / "test.jsonl", 6)
    groups = read_candidates(assets["candidates"])
    fixed = tmp_path / "fixed.jsonl"
    write_candidates(fixed, groups)
    common = [
        "--stage=eval",
        f"--model={assets['model']}",  # any HF folder; `aft-fast eval --model` is the same option
        f"--test_data={test}",
        f"--eval_candidates={fixed}",
        "--max_new_tokens=10",
        "--gen_batch_size=2",
        "--eval_samples=3",
        "--progress=false",
    ]
    one = tmp_path / "one"
    r = subprocess.run(
        [sys.executable, "train.py", *common, f"--run_dir={one}"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "greedy accuracy" in r.stdout and "maj@3" in r.stdout and "fixed-set assessment" in r.stdout
    two = tmp_path / "two"
    check(launch(2, [*common, f"--run_dir={two}"], timeout=300))
    for run in (one, two):
        for name in (
            "predictions_eval.jsonl",
            "eval_eval.json",
            "test_candidates_eval.jsonl",
            "scores_eval.png",
        ):
            assert (run / name).is_file(), (run, name)
    s1 = json.loads((one / "eval_eval.json").read_text())
    s2 = json.loads((two / "eval_eval.json").read_text())
    assert s1["questions"] == 6 and s1["eval/fixed_assess_pairs"] > 0
    for key, value in s1.items():
        if key.startswith("eval/"):  # None: undefined (e.g. no own sample pair on an untrained model)
            want = None if value is None else pytest.approx(value, rel=1e-5, abs=1e-6)
            assert s2[key] == want, key
    p1 = [json.loads(x) for x in (one / "predictions_eval.jsonl").read_text().splitlines()]
    p2 = [json.loads(x) for x in (two / "predictions_eval.jsonl").read_text().splitlines()]
    assert [(p["id"], p["output"], p["votes"]) for p in p1] == [
        (p["id"], p["output"], p["votes"]) for p in p2
    ]
    assert (one / "scores_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_rejects_a_missing_candidate_file(assets, tmp_path):
    test = _test_file(tmp_path / "test.jsonl", 2)
    r = subprocess.run(
        [
            str(Path(sys.executable).with_name("aft-fast")),
            "eval",
            f"--eval_model={assets['model']}",
            f"--test_data={test}",
            f"--eval_candidates={tmp_path / 'missing.jsonl'}",
            f"--run_dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "missing.jsonl" in r.stderr
