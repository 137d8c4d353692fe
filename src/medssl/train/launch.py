"""Entry point for one run under torchrun: ``torchrun --nproc_per_node N -m medssl.train.launch
--kind pretrain|finetune --config FILE --run-dir DIR``. Every rank runs this; rank 0 writes.
``--kind`` is a key of ``medssl.train.kinds.TRAINING_KINDS``; ``FILE`` is read with that kind's config model."""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from medssl.errors import MedsslInputError
from medssl.train.kinds import TRAINING_KINDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medssl.train.launch")
    parser.add_argument("--kind", choices=sorted(TRAINING_KINDS), required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    try:
        kind = TRAINING_KINDS[args.kind]
        kind.run(kind.load_config(args.config), args.run_dir)
    except MedsslInputError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
