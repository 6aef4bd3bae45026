"""LibTorch's product of one row with a weight [O, I], float32 against bf16 (docs/performance.md, "bf16
inference: why a kernel of our own"), one thread, interleaved per shape: why decode with bf16-stored weights
does not go through LibTorch. Run with Debian's python3-torch, the same build as libtorch-dev:
    /usr/bin/python3 bench/bf16_gemv.py [REPS=300]
"""
import sys
import time

import torch


def per_call_us(f, reps):
    for _ in range(5):
        f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t0) / reps * 1e6


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    torch.set_num_threads(1)
    print("O x I       weight MiB (fp32)  fp32 us  bf16 us  bf16/fp32 time")
    for o, i in [(256, 256), (688, 512), (1536, 512), (2048, 512), (4096, 1024), (8192, 4096)]:
        w = torch.randn(o, i)
        x = torch.randn(1, i)
        w16, x16 = w.bfloat16(), x.bfloat16()
        n = max(5, reps * 512 * 512 // (o * i))
        t32 = per_call_us(lambda: torch.nn.functional.linear(x, w), n)
        t16 = per_call_us(lambda: torch.nn.functional.linear(x16, w16), n)
        print("%5d x %-5d %8.1f %16.1f %8.1f %10.2f" % (o, i, o * i * 4 / 2**20, t32, t16, t16 / t32))


if __name__ == "__main__":
    main()
