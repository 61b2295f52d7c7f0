"""aft_optimizer vft: the aft stage starts from the VFT stage's final AdamW moments and step count (its own lr
schedule kept), read from the DeepSpeed checkpoint the vft stage writes at its end; and the clear errors when
that checkpoint cannot serve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aft_fast.train.config import InputError, load_config
from tests._train_support import check, losses, make_assets, run_python

VFT_STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("carry"), n_groups=16)


def _common(run_dir: Path) -> list[str]:
    return [
        f"--run_dir={run_dir}",
        "--max_length=160",
        "--log_every=1",
        "--progress=false",
        "--tensorboard=false",
        "--aft_optimizer=vft",
    ]


@pytest.fixture(scope="module")
def vft_run(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vft_run")
    r = run_python(
        [
            "--stage=vft",
            f"--model={assets['model']}",
            f"--tokenizer={assets['tokenizer']}",
            "--synthetic_train=64",
            f"--vft_steps={VFT_STEPS}",
            "--vft_batch_size=8",
            "--vft_micro_batch_size=8",
            "--save_every=0",
            *_common(run_dir),
        ],
        timeout=900,
    )
    check(r)
    return run_dir


def _aft(assets, vft_model: Path, run_dir: Path, optimizer: str):
    return run_python(
        [
            "--stage=aft",
            f"--vft_model={vft_model}",
            f"--candidates={assets['candidates']}",
            "--aft_steps=2",
            "--aft_batch_size=4",
            "--aft_micro_batch_size=4",
            "--aft_lr=1e-3",
            "--mode=bcl",
            "--beta=0.5",
            "--save_every=1",  # the checkpoint after aft's first step holds the moments it stepped with
            *_common(run_dir),
            f"--aft_optimizer={optimizer}",
        ],
        timeout=900,
    )


def _adam_state(ckpt: Path) -> dict:
    """The torch AdamW state of the one rank's ZeRO-3 partition (a single flat fp32 group)."""
    (path,) = ckpt.glob("*optim_states.pt")
    sd = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    (state,) = sd["optimizer_state_dict"]["state"].values()
    return state


def test_config_refuses_an_unknown_choice_and_adapters():
    with pytest.raises(InputError, match="aft_optimizer: 'adam' is not one of fresh, vft"):
        load_config(["--aft_optimizer=adam"])
    with pytest.raises(InputError, match="aft_optimizer: vft carries the moments of full fine-tuning"):
        load_config(["--aft_optimizer=vft", "--lora_r=4"])


def test_vft_writes_its_final_checkpoint(vft_run):
    ckpt = vft_run / "checkpoints" / "vft"
    assert (ckpt / "latest").read_text().strip() == f"step{VFT_STEPS:07d}"
    assert int(_adam_state(ckpt / f"step{VFT_STEPS:07d}")["step"]) == VFT_STEPS


def test_aft_continues_the_vft_moments_with_its_own_schedule(assets, vft_run, tmp_path):
    carried, fresh = tmp_path / "carried", tmp_path / "fresh"
    r = _aft(assets, vft_run / "vft", carried, "vft")
    check(r)
    assert "[aft] AdamW moments carried over from" in r.stdout
    check(_aft(assets, vft_run / "vft", fresh, "fresh"))

    end_of_vft = _adam_state(vft_run / "checkpoints" / "vft" / f"step{VFT_STEPS:07d}")
    after_one = {
        name: _adam_state(d / "checkpoints" / "aft" / "step0000001")
        for name, d in (("carried", carried), ("fresh", fresh))
    }
    assert int(after_one["carried"]["step"]) == VFT_STEPS + 1
    assert int(after_one["fresh"]["step"]) == 1
    # v_1 = beta2 * v_vft + (1 - beta2) * g^2 >= beta2 * v_vft (beta2 0.95): the VFT second moments are in it.
    v_vft, v_carried = end_of_vft["exp_avg_sq"], after_one["carried"]["exp_avg_sq"]
    assert v_vft.abs().sum() > 0
    assert torch.all(v_carried >= 0.95 * v_vft * (1 - 1e-5))
    assert not torch.allclose(v_carried, after_one["fresh"]["exp_avg_sq"])
    # aft's own schedule in both runs (the VFT stage's last lr is not carried into the first step)
    assert losses(carried, "aft", "train/lr") == losses(fresh, "aft", "train/lr")


def test_aft_without_a_vft_checkpoint_says_what_to_do(assets, tmp_path):
    r = _aft(assets, assets["model"], tmp_path / "run", "vft")
    assert r.returncode != 0
    assert "aft_optimizer vft: no VFT checkpoint in" in r.stdout
