"""Writes every golden file into the folder given as the first argument. Run with Debian's python3-torch:
/usr/bin/python3 scripts/golden/make_all.py OUT_DIR"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import moe_block  # noqa: E402
import train_steps  # noqa: E402
import transformer  # noqa: E402


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(1)
    moe_block.write(out_dir)
    transformer.write(out_dir)
    train_steps.write(out_dir)


if __name__ == "__main__":
    main()
