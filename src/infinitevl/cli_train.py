"""`infinitevl train <stage>` and `infinitevl convert`.

    infinitevl train distill-layer --config configs/distill_layer.yaml [--set run.epochs=2 ...]
    infinitevl train distill-e2e   --config configs/distill_e2e.yaml
    infinitevl train sft           --config configs/sft.yaml
    infinitevl train long-sft      --config configs/long_sft.yaml
    infinitevl convert --teacher Qwen2.5-VL-3B-Instruct/ --out student-init/
    infinitevl merge-lora runs/long-sft/step-000500 --out long-sft-500/

The same command runs in one process (CPU or one GPU) or under torchrun for several:
    torchrun --nproc_per_node 8 -m infinitevl.cli_train train sft --config configs/sft.yaml
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from .training import options

# stage name -> (module path, config class name); imported lazily so `--help` stays fast.
STAGES = {
    "distill-layer": ("infinitevl.training.distill_layer", "DistillLayerConfig"),
    "distill-e2e": ("infinitevl.training.distill_e2e", "DistillE2EConfig"),
    "sft": ("infinitevl.training.sft", "SFTConfig"),
    "long-sft": ("infinitevl.training.long_sft", "LongSFTConfig"),
}


def _stage(name: str):
    import importlib

    mod_name, cls_name = STAGES[name]
    mod = importlib.import_module(mod_name)
    return mod, getattr(mod, cls_name)


def train_main(argv: list[str] | None = None) -> int:
    """Runs one training stage; returns the process exit code (0 done, 3 stopped early by run.stop_after)."""
    from .cli import HelpFormatter

    argv = list(sys.argv[1:] if argv is None else argv)
    # `train <stage> --help` lists that stage's config keys
    stage = next((a for a in argv if a in STAGES), None) if {"-h", "--help"} & set(argv) else None
    epilog = (f"config keys of {stage} (YAML sections of --config, or --set KEY=VALUE), with their defaults:\n"
              f"{options.keys_help(_stage(stage)[1])}" if stage else
              "infinitevl train STAGE --help lists the stage's config keys with their defaults.")
    ap = argparse.ArgumentParser(prog="infinitevl train", description="Train one stage of the InfiniteVL recipe.",
                                 formatter_class=HelpFormatter, epilog=epilog)
    ap.add_argument("stage", choices=sorted(STAGES), help="which stage to run")
    ap.add_argument("--config", help="YAML file mirroring the stage's config dataclass (see configs/; needed in "
                                      "practice: without it every key has its default and model/teacher are empty)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set run.epochs=2 --set data.max_tokens=4096 (repeatable)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    args = ap.parse_args(argv)
    mod, cls = _stage(args.stage)
    required = "teacher" if args.stage.startswith("distill") else "model"
    try:
        try:
            cfg = options.load(cls, args.config, args.overrides)
        except ValueError as e:
            if not (args.print_config and f"{required} is empty" in str(e)):
                raise
            # the defaults can be printed before the model is chosen
            cfg = options.load(cls, args.config, [*args.overrides, f"{required}=unset"])
            setattr(cfg, required, "")
    except (ValueError, TypeError) as e:
        hint = "" if args.config else (f" (no --config given: start from a stage's file, e.g. --config "
                                       f"configs/{args.stage.replace('-', '_')}.yaml)")
        ap.error(f"{e}{hint}")
    if args.print_config:
        print(json.dumps(asdict(cfg), indent=2))
        return 0
    # before the first CUDA allocation: a training step's activations and loss chunks come in many sizes, and
    # expandable segments stop their free blocks from fragmenting the GPU's memory (~1.5 GiB at the 4B shape).
    # A caller that already used CUDA in this process keeps its allocator; the variable then stays set for
    # the process and its children.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch.distributed as torch_dist

    from .training import distributed

    options.check_output_dir(cfg.run.output_dir)  # before minutes of loading
    owned = not torch_dist.is_initialized()  # a caller that started the process group keeps it
    d = distributed.init(cfg.run.device)
    try:
        result = mod.run(cfg, d=d)
    except KeyboardInterrupt:
        from .training.checkpointing import latest

        last = latest(Path(cfg.run.output_dir))
        print(f"\ninterrupted: {f'the last checkpoint {last} is intact' if last else 'no checkpoint was written yet'};"
              " run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if owned:
            distributed.shutdown(d)
    if d.main:
        last = result.history[-1] if result.history else {}
        print(json.dumps({"stage": args.stage, "step": result.final_step, "total_steps": result.total_steps,
                          "loss": last.get("loss"), "stopped_early": result.stopped_early,
                          "output_dir": cfg.run.output_dir}))
    return 3 if result.stopped_early else 0


def convert_main(argv: list[str] | None = None) -> int:
    """Teacher (transformers Qwen2.5-VL checkpoint dir) -> student init (InfiniteVL checkpoint dir)."""
    from .cli import HelpFormatter
    from .training.student import StudentSpec, convert

    d = StudentSpec()
    ap = argparse.ArgumentParser(
        prog="infinitevl convert",
        description="Turn a transformers Qwen2.5-VL checkpoint into an InfiniteVL initialisation:\nlayers i with "
                    "i % attention_every != 0 become Gated DeltaNet (mimic init), everything else is copied.",
        formatter_class=HelpFormatter)
    ap.add_argument("--teacher", required=True, help="transformers Qwen2.5-VL checkpoint directory")
    ap.add_argument("--out", required=True, help="output directory (InfiniteVL released format)")
    ap.add_argument("--attention-every", type=int, default=d.attention_every,
                    help="one sliding-window layer every N layers (the rest Gated DeltaNet)")
    ap.add_argument("--sliding-window", type=int, default=d.sliding_window, help="window of the attention layers")
    ap.add_argument("--norm-eps", type=float, default=d.norm_eps, help="epsilon of the GDN output norm")
    ap.add_argument("--linear-head-dim", type=int, default=None, help="default: the teacher's head dim")
    ap.add_argument("--num-linear-heads", type=int, default=None, help="default: the teacher's attention heads")
    ap.add_argument("--no-mimic-init", action="store_true", help="keep the plain GDN init")
    ap.add_argument("--seed", type=int, default=0, help="seed of the new layers' init")
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    args = ap.parse_args(argv)
    try:
        spec = StudentSpec(attention_every=args.attention_every, sliding_window=args.sliding_window,
                           norm_eps=args.norm_eps, linear_head_dim=args.linear_head_dim,
                           num_linear_heads=args.num_linear_heads, mimic_init=not args.no_mimic_init, seed=args.seed)
        student = convert(args.teacher, args.out, spec, overwrite=args.force)
    except ValueError as e:
        ap.error(str(e))
    kinds = student.config.text.layer_types
    print(f"wrote {args.out}: {kinds.count('linear_attention')} GDN + {kinds.count('sliding_attention')} "
          f"sliding-window layers (window {spec.sliding_window})")
    return 0


def merge_main(argv: list[str] | None = None) -> int:
    """A long-sft training checkpoint (unmerged LoRA adapters) -> a plain released-format checkpoint."""
    from .cli import HelpFormatter
    from .training.lora import merge_checkpoint

    ap = argparse.ArgumentParser(
        prog="infinitevl merge-lora",
        description="Fold the LoRA adapters of a long-sft training checkpoint (a step-* directory) into its\n"
                    "weights, giving a checkpoint that generate, stream and from_pretrained load (a finished\n"
                    "run's final/ is merged already).", formatter_class=HelpFormatter)
    ap.add_argument("checkpoint", help="a step-* directory of a long-sft run")
    ap.add_argument("--out", required=True, help="output directory (InfiniteVL released format)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    args = ap.parse_args(argv)
    try:
        out = merge_checkpoint(args.checkpoint, args.out, overwrite=args.force)
    except ValueError as e:
        ap.error(str(e))
    print(f"wrote {out}: the adapters of {args.checkpoint} merged")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m infinitevl.cli_train {train,convert,merge-lora} ...` (for torchrun, which needs a module or
    script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train_main, "convert": convert_main, "merge-lora": merge_main}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m infinitevl.cli_train {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
