"""Training: teacher -> student conversion, the published distillation + SFT stages, LoRA long-SFT.

student.py (convert), data.py + vision_inputs.py (records -> samples), packing.py + loader.py (rows,
epochs, ranks), losses.py, params.py (what trains), lora.py, loop.py (the trainer), checkpointing.py,
distributed.py (torchrun: DDP / FSDP2), runner.py (a stage's plumbing), options.py (YAML configs),
one file per stage: distill_layer.py (1a), distill_e2e.py (1b), sft.py (2), long_sft.py (3),
evaluate.py (exact-match accuracy). The CLI is infinitevl/cli_train.py.
"""
