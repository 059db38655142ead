"""The floor under the 7B training step: only its tensor-core work, back to back (docs/performance.md, "Next").

One "step" here is what no kernel of ours can remove without changing the arithmetic: per decoder layer the
base projections' GEMMs (q|k|v, o, gate|up, down: x W^T forward, dy W backward, as cuBLAS runs them in the
step, each layer's weights its own 0.4 GB so none stays in L2), lm_head's forward and dx, and with
--attention on cuDNN's causal attention forward and backward (the step's backend on the H100). No
dequantization, no adapters, no element-wise kernels, no optimizer: a lower bound on our step's time. With
--recompute on, selective recomputation's extra GEMMs too (q|k|v and gate|up again in every layer, the
attention kept). Steps are queued back to back as the trainer's are, so the card meets its power cap the way
the step does; gpu.sh's `floor` samples the clock and power over the timed steps (the JSON's timed_unix_s).

Run: python3 kernels/dev/step_floor.py [--attention on|off] [--recompute on|off] [--json F] (needs a GPU).
"""
import argparse
import json
import time

import torch

# Llama-2-7B
LAYERS, HIDDEN, INTER, HEADS, VOCAB = 32, 4096, 11008, 32, 32000
D = HIDDEN // HEADS


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--attention", choices=("on", "off"), default="on")
    ap.add_argument("--recompute", choices=("on", "off"), default="off")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args()
    dev, bf, T = torch.device("cuda"), torch.bfloat16, a.seq
    torch.manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=dev, dtype=bf) * 0.02

    # Each layer's weights as the step's groups ([out, in], row-major, as dequantized).
    shapes = {"qkv": (3 * HIDDEN, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN),
              "down": (HIDDEN, INTER)}
    W = [{g: rand(*s) for g, s in shapes.items()} for _ in range(LAYERS)]
    lm_head = rand(VOCAB, HIDDEN)
    # Activations: one buffer per role (read back from L2 more than the step's would be: still a lower bound).
    x, h = rand(T, HIDDEN), rand(T, INTER)
    y = {g: torch.empty(T, s[0], device=dev, dtype=bf) for g, s in shapes.items()}
    dy = {g: rand(T, s[0]) for g, s in shapes.items()}
    dx = {g: torch.empty(T, s[1], device=dev, dtype=bf) for g, s in shapes.items()}
    logits, dlogits = torch.empty(T, VOCAB, device=dev, dtype=bf), rand(T, VOCAB)
    # q, k, v as views of one [T, 3 H, D] buffer, as the trainer's RoPE split leaves them, seen as [1, H, T, D].
    qkv = rand(T, 3 * HEADS, D)
    q, k, v = (qkv[:, i * HEADS:(i + 1) * HEADS].unsqueeze(0).transpose(1, 2) for i in range(3))
    dout = rand(T, HEADS, D).unsqueeze(0).transpose(1, 2)
    scale = D ** -0.5
    attention = a.attention == "on"
    saved = {}

    def attn_forward():
        saved["out"] = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                                           scale=scale)

    def attn_backward():
        o = saved["out"]
        torch.ops.aten._scaled_dot_product_cudnn_attention_backward(dout, q, k, v, o[0], o[1], o[6], o[7], None, o[2],
                                                                    o[3], T, T, 0.0, True, scale=scale)

    def step():
        for w in W:
            torch.mm(x, w["qkv"].t(), out=y["qkv"])
            if attention:
                attn_forward()
            torch.mm(x, w["o"].t(), out=y["o"])
            torch.mm(x, w["gate_up"].t(), out=y["gate_up"])
            torch.mm(h, w["down"].t(), out=y["down"])
        torch.mm(x, lm_head.t(), out=logits)
        torch.mm(dlogits, lm_head, out=dx["o"])
        for w in reversed(W):
            if a.recompute == "on":
                torch.mm(x, w["qkv"].t(), out=y["qkv"])
                torch.mm(x, w["gate_up"].t(), out=y["gate_up"])
            torch.mm(dy["down"], w["down"], out=dx["down"])
            dx["gate_up"].addmm_(dy["gate_up"], w["gate_up"])  # the step adds onto the residual's gradient
            dx["o"].addmm_(dy["o"], w["o"])
            if attention:
                attn_backward()
            dx["qkv"].addmm_(dy["qkv"], w["qkv"])

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    t1 = time.time()
    step_ms = (t1 - t0) * 1e3 / a.steps

    gemm = sum(2 * T * o * i for o, i in shapes.values()) * 2 * LAYERS + 2 * 2 * T * VOCAB * HIDDEN
    if a.recompute == "on":
        gemm += 2 * T * HIDDEN * (3 * HIDDEN + 2 * INTER) * LAYERS
    attn = (4 * T * T / 2 * D * HEADS) * 3.5 * LAYERS if attention else 0  # causal; backward 2.5x the forward
    res = {"seq": T, "attention": attention, "recompute": a.recompute == "on", "step_ms": step_ms,
           "tokens_per_s": T / step_ms * 1e3, "tflops": (gemm + attn) / step_ms / 1e9,
           "gemm_tflop_per_step": gemm / 1e12, "attention_tflop_per_step": attn / 1e12, "timed_unix_s": [t0, t1],
           "device": torch.cuda.get_device_name()}
    print(f"floor (GEMMs{' + attention' if attention else ''}{' + recomputation' if res['recompute'] else ''}): "
          f"{step_ms:.1f} ms a step, {res['tokens_per_s']:.0f} tokens/s, {res['tflops']:.0f} TFLOP/s")
    if a.json:
        json.dump(res, open(a.json, "w"))


if __name__ == "__main__":
    main()
