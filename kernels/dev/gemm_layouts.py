"""The 7B step's base GEMMs timed alone on the GPU, per layout (docs/performance.md, tried and dropped): the
forward y = x W^T, the backward's dx += dy W as the step runs it (W row-major [out, in], beta 1 onto dx),
the same with beta 0, and dx += dy (W^T)^T with the weight stored transposed. Prints us and TFLOP/s per
shape. Operands rotate over copies larger than L2. Run: python3 kernels/dev/gemm_layouts.py (needs a GPU).
"""
import torch

from cuda_timing import cuda_ms

T = 2048
SHAPES = {"q|k|v": (12288, 4096), "o": (4096, 4096), "gate|up": (22016, 4096), "down": (4096, 11008)}
dev = torch.device("cuda")
bf = torch.bfloat16


def timeit(fn):
    return cuda_ms(fn, iters=30, warmup=5) * 1e3  # us


print(f"{'group':8s} {'fwd x W^T':>16s} {'dx += dy W':>16s} {'dx = dy W':>16s} {'dx += dy Wt^T':>16s}")
for name, (out, inn) in SHAPES.items():
    copies = 4
    W = [torch.randn(out, inn, device=dev, dtype=bf) * 0.02 for _ in range(copies)]
    Wt = [w.t().contiguous() for w in W]
    x = [torch.randn(T, inn, device=dev, dtype=bf) for _ in range(copies)]
    dy = [torch.randn(T, out, device=dev, dtype=bf) for _ in range(copies)]
    dx = [torch.randn(T, inn, device=dev, dtype=bf) for _ in range(copies)]
    y = [torch.empty(T, out, device=dev, dtype=bf) for _ in range(copies)]
    flop = 2 * T * out * inn
    turn = [0]

    def rotating(op):
        def run():
            turn[0] = (turn[0] + 1) % copies
            op(turn[0])
        return run

    fwd = rotating(lambda k: torch.mm(x[k], W[k].t(), out=y[k]))
    bwd_add = rotating(lambda k: dx[k].addmm_(dy[k], W[k]))
    bwd_set = rotating(lambda k: torch.mm(dy[k], W[k], out=dx[k]))
    bwd_t = rotating(lambda k: dx[k].addmm_(dy[k], Wt[k].t()))

    row = [timeit(f) for f in (fwd, bwd_add, bwd_set, bwd_t)]
    print(f"{name:8s} " + " ".join(f"{us:7.1f} {flop / us / 1e6:4.0f}TF " for us in row))
