"""Run under torchrun by test_distributed.py: the `infinitevl train sft` entry point once per config
given (DDP, then FSDP2), in the same two processes and process group to pay the start-up once."""
import sys

from infinitevl.cli_train import train_main
from infinitevl.training import distributed

if __name__ == "__main__":
    d = distributed.init("cpu")
    try:
        for config in sys.argv[1:]:
            if train_main(["sft", "--config", config]) != 0:
                sys.exit(1)
    finally:
        distributed.shutdown(d)
