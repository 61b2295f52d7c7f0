"""TrainConfig: defaults < YAML < flags, unknown keys fail with the valid list, --help covers every key,
and the DeepSpeed JSON's "auto" fields are filled from it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from aft_fast.train.config import InputError, TrainConfig, build_parser, load_config
from aft_fast.train.engine import CONFIG_DIR, ds_config, grad_accum_steps, model_dtype

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def test_precedence_defaults_yaml_flags(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("vft_steps: 7\nmode: dpo\nresume: true\nvft_lr: 1e-3\n")
    cfg = load_config(["--config", str(y), "--vft_steps=9", "--beta", "0.25"])
    assert (cfg.vft_steps, cfg.mode, cfg.resume, cfg.beta, cfg.vft_lr) == (9, "dpo", True, 0.25, 1e-3)
    assert cfg.aft_steps == TrainConfig().aft_steps


def test_booleans_and_types():
    assert load_config(["--resume"]).resume is True
    assert load_config(["--tensorboard=false", "--resume=yes"]).tensorboard is False
    with pytest.raises(SystemExit):
        load_config(["--vft_steps=many"])


def test_unknown_keys_fail_with_the_valid_list(tmp_path, capsys):
    y = tmp_path / "bad.yaml"
    y.write_text("vft_stpes: 3\n")
    with pytest.raises(InputError, match=r"unknown config key\(s\) vft_stpes; valid keys: stage, run_dir"):
        load_config(["--config", str(y)])
    with pytest.raises(SystemExit) as e:
        load_config(["--no_such_key=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--no_such_key" in err and "valid keys: stage, run_dir" in err and "aft_micro_batch_size" in err


def test_value_checks():
    with pytest.raises(InputError, match="mode: 'nope' is not one of"):
        load_config(["--mode=nope"])
    with pytest.raises(InputError, match="stage"):
        TrainConfig(stage="train")
    with pytest.raises(InputError, match="vft_steps: must be at least 1"):
        load_config(["--vft_steps=0"])


def test_help_explains_every_option():
    text = build_parser().format_help()
    for name in FIELDS:
        assert f"--{name}" in text, name
    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainConfig))


def test_shipped_run_config_loads():
    cfg = load_config(["--config", str(CONFIG_DIR / "default.yaml")])
    assert cfg.stage == "all" and cfg.vft_steps > 0


@pytest.mark.parametrize("name", ["ds_zero3_cpu_fp32.json", "ds_zero3_gpu_bf16.json"])
def test_deepspeed_auto_fields_are_filled(name):
    cfg = ds_config(CONFIG_DIR / name, micro_batch=4, grad_accum=2, world_size=8, grad_clip=0.5)
    assert (
        cfg["train_micro_batch_size_per_gpu"],
        cfg["gradient_accumulation_steps"],
        cfg["train_batch_size"],
        cfg["gradient_clipping"],
    ) == (4, 2, 64, 0.5)
    assert cfg["zero_optimization"]["stage"] == 3
    assert "auto" not in json.dumps(cfg)
    assert str(model_dtype(cfg)) == ("torch.bfloat16" if "bf16" in name else "torch.float32")


def test_deepspeed_config_conflicts_fail(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu = 8, but the run config implies 4"):
        ds_config(p, micro_batch=4, grad_accum=1, world_size=1, grad_clip=1.0)
    p.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="stage must be 3"):
        ds_config(p, micro_batch=4, grad_accum=1, world_size=1, grad_clip=1.0)
    assert grad_accum_steps(32, 4, 2, "vft") == 4
    with pytest.raises(ValueError, match="not a multiple"):
        grad_accum_steps(30, 4, 2, "vft")


def test_resume_refuses_a_different_run():
    from aft_fast.train.loop import check_resumable

    cfg = TrainConfig(aft_batch_size=8, aft_micro_batch_size=4)
    saved = {"step": 4, "world_size": 2, "config": cfg.to_dict()}
    check_resumable(saved, cfg, "aft", 2)
    check_resumable(saved, TrainConfig(aft_batch_size=8, aft_micro_batch_size=4, vft_lr=1.0), "aft", 2)
    with pytest.raises(InputError, match=r"aft_batch_size: 8 -> 16; processes: 2 -> 4"):
        check_resumable(saved, TrainConfig(aft_batch_size=16, aft_micro_batch_size=4), "aft", 4)
    with pytest.raises(InputError, match="mode: 'bcl' -> 'dpo'"):
        check_resumable(saved, TrainConfig(aft_batch_size=8, aft_micro_batch_size=4, mode="dpo"), "aft", 2)
    spread = TrainConfig(aft_batch_size=8, aft_micro_batch_size=4, beta_from_spread=2.0)
    with pytest.raises(InputError, match="beta_from_spread: 0.0 -> 2.0"):
        check_resumable(saved, spread, "aft", 2)


def test_sections_hold_every_field_once_and_group_help():
    from aft_fast.train.config import SECTIONS, build_parser

    names = [k for keys in SECTIONS.values() for k in keys]
    assert sorted(names) == sorted(TrainConfig().to_dict()) and len(names) == len(set(names))
    assert list(SECTIONS) == [
        "run", "data", "model", "adapters", "optimizer", "vft", "sample", "aft", "eval", "engine"
    ]  # fmt: skip
    assert SECTIONS["vft"] == ("vft_steps", "vft_batch_size", "vft_micro_batch_size", "vft_lr")
    text = build_parser().format_help()
    assert text.index("aft section:") < text.index("\n  --beta ") < text.index("eval section:")
    cfg = TrainConfig(aft_steps=7, aft_lr=3e-5, warmup_ratio=0.2)
    s = cfg.schedule("aft")
    assert (s.steps, s.batch_size, s.lr, s.warmup_ratio, s.grad_clip) == (7, 16, 3e-5, 0.2, 1.0)
    assert cfg.schedule("vft").steps == 450


def test_resume_compares_the_stage_section_not_the_engine():
    from aft_fast.train.loop import check_resumable

    saved = {"step": 4, "world_size": 1, "config": TrainConfig().to_dict()}
    # How the computation runs (engine), where outputs go and what eval reads may change on resume...
    for change in (
        {"loss_backend": "torch"},
        {"layout": "padded"},
        {"merge_adapters": False, "eval_limit": 5},
        {"num_samples": 3},
    ):
        check_resumable(saved, TrainConfig(**change), "aft", 1)
    # ...what the stage trains on and how may not: the optimizer, the adapters, the data's rows and order.
    for change, field in (
        ({"weight_decay": 0.0}, "weight_decay"),
        ({"lora_r": 4}, "lora_r"),
        ({"prompt_format": "chat"}, "prompt_format"),
        ({"seed": 1}, "seed"),
        ({"vft_steps": 9}, "vft_steps"),
    ):
        stage = "vft" if field == "vft_steps" else "aft"
        with pytest.raises(InputError, match=f"{field}: "):
            check_resumable(saved, TrainConfig(**change), stage, 1)
    check_resumable(saved, TrainConfig(vft_steps=9), "aft", 1)  # another stage's section
