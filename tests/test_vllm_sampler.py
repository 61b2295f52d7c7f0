"""--sampler vllm (aft_fast/eval/vllm_sampler.py): vLLM's engine in its own environment, behind the same
`Sampler` seam as the Hugging Face sampler.

- a missing or broken vLLM environment is refused before any stage starts, with the command that makes it;
- greedy decoding with vLLM equals Hugging Face greedy on a tiny Llama, token for token (where they part,
  only at a near-tie of the model's own logits, bounded below);
- the sample stage under --sampler vllm writes a valid candidate file whose labels and counts follow from
  the text, byte-identical on a second run with the same seed, there on two ranks with an engine each;
  its metadata has the hf run's fields;
- eval runs with --sampler vllm.

The tests that run vLLM create its environment with `make vllm-env` when it is missing (as `make test`
does first): they never skip for want of it. The refusal tests do not need it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from aft_fast.data.candidates import CandidateGroup, label_candidates, read_candidates
from aft_fast.data.collate import encode_prompt
from aft_fast.data.synthetic import generate_problems
from aft_fast.eval.sampler import HFSampler, SamplingParams
from aft_fast.eval.vllm_sampler import (
    DEFAULT_PYTHON,
    SETUP,
    VLLMOptions,
    VLLMSampler,
    check_vllm_python,
    engine_folder,
)
from aft_fast.models.folders import save_hf_folder
from aft_fast.models.loading import load_replica, load_tokenizer
from aft_fast.train.sample import group_stats, meta_path
from tests._train_support import ROOT, check, clean_env, launch, run_python

# Small enough for a 2-core machine: one engine start is most of each test's time.
STAGE_ARGS = [
    "--synthetic_train=40",
    "--synthetic_test=8",
    "--sample_limit=6",
    "--num_samples=4",
    "--max_new_tokens=24",
    "--gen_batch_size=4",
    "--progress=false",
    "--tensorboard=false",
]


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """vLLM's interpreter, its environment made by `make vllm-env` where it is missing (a no-op when
    `make test` made it first)."""
    subprocess.run(["make", "-s", "vllm-env"], cwd=ROOT, check=True, timeout=1800)
    return str(ROOT / DEFAULT_PYTHON)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny Llama, tokenizer trained on the task, random weights drawn wide (std 0.2) so
    that its greedy chains vary token by token and sometimes end (std 0.02 repeats one token)."""
    from benchmarks.bench_sample import tiny_model as make_tiny_model  # the benchmark's own tiny model

    return make_tiny_model(tmp_path_factory.mktemp("vllm_tiny"))


def test_missing_environment_is_refused_with_the_command_that_makes_it(tmp_path):
    with pytest.raises(ValueError, match=rf"vllm_python: {tmp_path}/nope does not exist.*`{SETUP}`"):
        check_vllm_python(str(tmp_path / "nope"))
    # A Python without vLLM (this one): a broken environment, refused the same way.
    with pytest.raises(ValueError, match=rf"vllm_python: .* cannot import vllm .*`{SETUP}`"):
        check_vllm_python(sys.executable)


def test_the_stage_is_refused_before_it_starts(tmp_path):
    run_dir = tmp_path / "run"
    r = run_python(
        ["--stage=sample", "--sampler=vllm", f"--vllm_python={tmp_path}/nope", f"--run_dir={run_dir}"],
        env=clean_env(),
        timeout=300,
    )
    assert r.returncode == 2, r.stdout
    assert "vllm_python" in r.stdout and SETUP in r.stdout, r.stdout
    assert not (run_dir / "data").exists() and not (run_dir / "candidates.jsonl").exists()


def test_config_checks_name_the_field():
    from aft_fast.train.config import InputError, TrainConfig

    with pytest.raises(InputError, match="sampler: 'trt' is not one of"):
        TrainConfig(sampler="trt")
    with pytest.raises(InputError, match="vllm_gpu_memory_utilization"):
        TrainConfig(vllm_gpu_memory_utilization=1.5)
    with pytest.raises(InputError, match="vllm_tensor_parallel_size"):
        TrainConfig(vllm_tensor_parallel_size=0)


def test_an_adapter_folder_reaches_the_engine_merged(tiny_model, tmp_path):
    """vLLM loads a plain Hugging Face folder: an adapter folder becomes its base with the adapters merged."""
    from aft_fast.models.adapters import LoraSettings, adapter_state_dict, add_lora

    tok = load_tokenizer(tiny_model)
    cpu = torch.device("cpu")
    assert engine_folder(tiny_model, torch.float32, tmp_path) == tiny_model
    lora = add_lora(
        load_replica(tiny_model, cpu, torch.float32), LoraSettings(r=4, init_weights=False), base=tiny_model
    )
    save_hf_folder(
        lora, tok, tmp_path / "vft", state_dict=adapter_state_dict(lora), trainer_state={"steps": 1}
    )
    folder = engine_folder(tmp_path / "vft", torch.float32, tmp_path / "scratch")
    assert (folder / "config.json").is_file() and not (folder / "adapter_config.json").exists()
    ids = torch.tensor([encode_prompt(tok, "Question: 3 + 4?")])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=ids).logits
        want = load_replica(tmp_path / "vft", cpu, torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(got, want)


def _hf_greedy_ids(model, tok, question: str, max_new_tokens: int) -> list[int]:
    """Hugging Face greedy decoding of one unpadded prompt, cut before eos."""
    prompt = torch.tensor([encode_prompt(tok, question)])
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    ids = model.generate(input_ids=prompt, generation_config=gen)[0, prompt.shape[1] :].tolist()
    return ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids


def _top2_gap(model, tok, question: str, prefix: list[int], a: int, b: int) -> float:
    """|logit a - logit b| of the model's next token after prompt + prefix."""
    ids = torch.tensor([encode_prompt(tok, question) + prefix])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    return abs(float(logits[a] - logits[b]))


def test_greedy_matches_hf_token_for_token(tiny_model, vllm_python):
    tok = load_tokenizer(tiny_model)
    model = load_replica(tiny_model, torch.device("cpu"), torch.float32)
    questions = [p.question for p in generate_problems(8, seed=3)]
    greedy = SamplingParams(max_new_tokens=40)
    with VLLMSampler(tiny_model, tok, options=VLLMOptions(python=vllm_python)) as engine:
        ids = engine.generate_ids(questions, greedy)
        texts = engine.generate(questions, greedy)
    hf_texts = HFSampler(model, tok).generate(questions, greedy)
    lengths = set()
    for q, got, text, hf_text in zip(questions, ids, texts, hf_texts, strict=True):
        want = _hf_greedy_ids(model, tok, q, 40)
        lengths.add(len(want))
        if got[0] == want:
            assert text == hf_text, "same tokens, same decoded chain"
            continue
        # fp32 kernels differ in the last bits: the two may part only where the model's top two logits tie.
        j = next((i for i, (x, y) in enumerate(zip(got[0], want, strict=False)) if x != y), None)
        assert j is not None, f"one chain stops early: {got[0]} vs {want}"
        assert _top2_gap(model, tok, q, want[:j], got[0][j], want[j]) < 1e-4, (q, j)
    assert len(lengths) > 1, "some chains end before max_new_tokens (eos), some do not"


def _stage_args(run_dir: Path, model: Path, python: str, sampler: str, seed: int) -> list[str]:
    return [
        "--stage=sample",
        f"--sampler={sampler}",
        f"--vllm_python={python}",
        f"--vft_model={model}",
        f"--run_dir={run_dir}",
        f"--seed={seed}",
        *STAGE_ARGS,
    ]


def _sample(run_dir: Path, model: Path, python: str, sampler: str = "vllm", seed: int = 0) -> Path:
    check(run_python(_stage_args(run_dir, model, python, sampler, seed), env=clean_env(), timeout=600))
    return run_dir / "candidates.jsonl"


@pytest.fixture(scope="session")
def vllm_runs(tiny_model, vllm_python, tmp_path_factory) -> tuple[Path, Path]:
    """The sample stage under --sampler vllm with the same seed twice: in one process, and on two ranks
    (DeepSpeed on the CPU), each sampling its share of the batches with an engine of its own."""
    root = tmp_path_factory.mktemp("vllm_runs")
    one = _sample(root / "one", tiny_model, vllm_python)
    check(launch(2, _stage_args(root / "two", tiny_model, vllm_python, "vllm", 0), timeout=900))
    return one, root / "two" / "candidates.jsonl"


def test_sample_stage_writes_a_valid_candidate_file(vllm_runs):
    path = vllm_runs[0]
    groups = read_candidates(path)  # the file's format, checked field by field
    assert len(groups) == 6
    assert all(1 <= len(g.candidates) <= 4 for g in groups)
    for g in groups:
        texts = [c.text for c in g.candidates]
        assert len(set(texts)) == len(texts), "duplicates dropped"
        # The labels follow from the text, by the run's rule, as under --sampler hf.
        fresh = CandidateGroup(g.id, g.question, g.gold, g.kind, g.reference)
        assert label_candidates(fresh, texts, "answer") == g
    # The counts of <file>.meta.json, recomputed from the file.
    meta = json.loads(meta_path(path).read_text())
    stats = group_stats(groups, 6 * 4, 0.0)
    assert meta["label"] == "answer"
    assert (meta["groups"], meta["candidates"], meta["duplicates"]) == (6, stats.candidates, stats.duplicates)
    assert (meta["positives"], meta["negatives"], meta["both"]) == (
        stats.positives,
        stats.negatives,
        stats.both,
    )
    assert meta["answer_positives"] == stats.answer_positives
    assert meta["answer_positives_false_step"] == stats.false_step


@pytest.mark.distributed
def test_same_seed_same_candidate_file(vllm_runs):
    """Every batch is reseeded by its index, on whichever rank's engine runs it: the same seed gives the
    same file, whatever the process count."""
    a, b = vllm_runs
    assert a.read_bytes() == b.read_bytes()
    assert meta_path(a).read_text() == meta_path(b).read_text()


def test_hf_and_vllm_write_the_same_kind_of_file(vllm_runs, tiny_model, vllm_python, tmp_path):
    hf = _sample(tmp_path / "hf", tiny_model, vllm_python, sampler="hf")
    a, b = read_candidates(vllm_runs[0]), read_candidates(hf)
    assert [(g.id, g.question, g.gold, g.reference) for g in a] == [
        (g.id, g.question, g.gold, g.reference) for g in b
    ]
    meta_vllm, meta_hf = (json.loads(meta_path(p).read_text()) for p in (vllm_runs[0], hf))
    assert meta_vllm.keys() == meta_hf.keys()


def test_eval_runs_with_vllm(tiny_model, vllm_python, tmp_path):
    run_dir = tmp_path / "eval"
    args = [
        "--stage=eval",
        "--sampler=vllm",
        f"--vllm_python={vllm_python}",
        f"--eval_model={tiny_model}",
        f"--run_dir={run_dir}",
        "--eval_limit=4",
        "--eval_samples=2",
        *STAGE_ARGS,
    ]
    check(run_python(args, env=clean_env(), timeout=600))
    summary = json.loads((run_dir / "eval_eval.json").read_text())
    assert summary["questions"] == 4 and summary["samples"] == 2
    assert "eval/accuracy" in summary and "eval/assess_acc" in summary
    records = [json.loads(line) for line in (run_dir / "predictions_eval.jsonl").read_text().splitlines()]
    assert all(1 <= len(r["candidates"]) <= 2 for r in records)
