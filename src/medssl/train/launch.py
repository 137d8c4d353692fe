"""Entry point for one run under torchrun: ``torchrun --nproc_per_node N -m medssl.train.launch
--kind pretrain|finetune --config FILE --run-dir DIR``. Every rank runs this; rank 0 writes."""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from medssl.config import FinetuneConfig, PretrainConfig, load_config
from medssl.errors import MedsslInputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medssl.train.launch")
    parser.add_argument("--kind", choices=["pretrain", "finetune"], required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    try:
        if args.kind == "pretrain":
            from medssl.train.pretrain import run_pretrain

            run_pretrain(load_config(PretrainConfig, args.config), args.run_dir)
        else:
            from medssl.train.finetune import run_finetune

            run_finetune(load_config(FinetuneConfig, args.config), args.run_dir)
    except MedsslInputError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
