from aft_fast.integrations.trl import AFTConfig, AFTTrainer, patch_trl

# One line puts TRL's trainers (DPO, KTO, GRPO, RLOO, SFT) on aft-fast's fused log-prob operator.
patch_trl()

# The AFT loss over candidate groups on the Hugging Face Trainer (accelerate: DDP and DeepSpeed ZeRO-3 are
# tested; PEFT through peft_config=...). Data: a candidate JSONL, or a datasets.Dataset with prompt /
# candidates / labels.
args = AFTConfig(
    output_dir="runs/default/aft-trainer",
    mode="bcl",  # the paper's boundary-constrained loss; also align, dcl, dpo, rrhf, pro, dpo+bc, ...
    beta=1.0,
    w_vft=1.0,
    w_align=1.0,
    layout="shared",  # each question's prompt encoded once for all its candidates
    per_device_train_batch_size=4,
    learning_rate=1e-4,
    num_train_epochs=1,
    report_to=[],
)
trainer = AFTTrainer(model="runs/default/vft", args=args, train_dataset="runs/default/candidates.jsonl")
trainer.train()
trainer.save_model()
