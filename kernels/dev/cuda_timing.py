"""Timing for the lab scripts beside this file: a GPU function's mean time over back-to-back calls."""
import torch


def cuda_ms(fn, iters=20, warmup=3):
    """Mean milliseconds a call of fn over `iters` calls queued back to back, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters
