"""The step's causal attention timed alone per backend (docs/performance.md, "Next" and tried and dropped):
cuDNN's and flash attention's forward and backward, for one causal sequence and for packed segments (flash
attention's variable-length form against cuDNN's ragged one, through the ATen ops, and against the segments
gathered into a right-padded batch for cuDNN's plain causal attention). q, k, v are views of one
[T, H + 2 Hkv, D] buffer as the trainer's RoPE split leaves them ([B, T, n, D] underneath). Prints ms and
TFLOP/s (causal FLOPs: forward 2 x 2 x sum(L^2)/2 x D x H, backward 2.5x) and the largest differences of
cuDNN's outputs and gradients from flash attention's (bf16: ~1e-2; in torch 2.11 the ragged form's are not).
Run: python3 kernels/dev/attention_backends.py (needs a GPU).
"""
import sys

import torch

from cuda_timing import cuda_ms as timeit

dev = torch.device("cuda")
bf = torch.bfloat16
D = 128


def report(name, fwd_ms, bwd_ms, flop_f, diff=None):
    """One backend's line: forward and backward ms and TFLOP/s (the backward's FLOPs 2.5x the forward's)."""
    extra = f" max|diff vs flash| {diff:.3g}" if diff is not None else ""
    print(f"  {name:13s} fwd {fwd_ms:6.3f} ms {flop_f / fwd_ms / 1e9:5.0f} TF  bwd {bwd_ms:6.3f} ms "
          f"{2.5 * flop_f / bwd_ms / 1e9:5.0f} TF  total {fwd_ms + bwd_ms:6.3f} ms{extra}")


def case(total, seg, h, hkv):
    torch.manual_seed(0)
    qkv = torch.randn(total, h + 2 * hkv, D, device=dev, dtype=bf)
    q, k, v = qkv[:, :h], qkv[:, h:h + hkv], qkv[:, h + hkv:]
    dout = torch.randn(total, h, D, device=dev, dtype=bf)
    lens = [seg] * (total // seg)
    offs = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=dev, dtype=torch.int32)
    scale = D ** -0.5
    flop_f = 4 * sum(l * l / 2 for l in lens) * D * h
    res = {}

    # flash, variable-length (the trainer's segments path; also one segment = plain causal)
    def fa_fwd():
        return torch.ops.aten._flash_attention_forward(q, k, v, offs, offs, seg, seg, 0.0, True, False, scale=scale)

    o, lse, rng, _, _ = fa_fwd()

    def fa_bwd():
        return torch.ops.aten._flash_attention_backward(dout, q, k, v, o, lse, offs, offs, seg, seg, 0.0, True, rng,
                                                        torch.empty(0, device=dev), scale=scale)

    res["flash varlen"] = (timeit(fa_fwd), timeit(fa_bwd))
    ref = (o, *fa_bwd())

    # cuDNN ragged (cum_seq) on the same [T, n, D] views
    try:
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()

        def cd_fwd():
            return torch.ops.aten._cudnn_attention_forward(qc, kc, vc, None, offs, offs, seg, seg, True, 0.0, True,
                                                           False, scale=scale)

        out = cd_fwd()
        co, clse = out[0], out[1]

        def cd_bwd():
            return torch.ops.aten._cudnn_attention_backward(dout, qc, kc, vc, co, clse, out[6], out[7], None, offs,
                                                            offs, seg, seg, 0.0, True, scale=scale)

        res["cudnn ragged"] = (timeit(cd_fwd), timeit(cd_bwd))
        got = (co, *cd_bwd())
        res["cudnn ragged"] += (max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref)),)
    except Exception as ex:  # noqa: BLE001: report what this torch/cuDNN refuses
        print(f"  cudnn ragged: {type(ex).__name__}: {str(ex).splitlines()[0][:150]}")

    if seg == total and hkv == h:
        # one sequence [1, n, T, D] views: cuDNN's plain causal (what SDPA picks on the H100)
        qb, kb, vb = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
        db = dout.unsqueeze(0).transpose(1, 2)

        def cp_fwd():
            return torch.ops.aten._scaled_dot_product_cudnn_attention(qb, kb, vb, None, True, 0.0, True, False,
                                                                      scale=scale)

        out = cp_fwd()

        def cp_bwd():
            return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                db, qb, kb, vb, out[0], out[1], out[6], out[7], None, out[2], out[3],
                total, total, 0.0, True, scale=scale)

        res["cudnn causal"] = (timeit(cp_fwd), timeit(cp_bwd))
        g = cp_bwd()
        got = (out[0].transpose(1, 2)[0], *(t.transpose(1, 2)[0] for t in g))
        res["cudnn causal"] += (max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref)),)

    for name, r in res.items():
        report(name, r[0], r[1], flop_f, r[2] if len(r) > 2 else None)


def padded_cudnn(lens, h):
    """Segments of `lens` tokens end to end, attended causally each: flash attention's variable-length kernels
    against the segments gathered into a right-padded batch [segments, longest, h, D], cuDNN's plain causal
    attention over it (exact for the real tokens: causal, the padding after them), and the outputs gathered
    back (the backward: dO into the padded batch, the gradients back)."""
    torch.manual_seed(0)
    total, longest, n = sum(lens), max(lens), len(lens)
    qkv = torch.randn(total, 3 * h, D, device=dev, dtype=bf)
    q, k, v = qkv[:, :h], qkv[:, h:2 * h], qkv[:, 2 * h:]
    dout = torch.randn(total, h, D, device=dev, dtype=bf)
    offs = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=dev, dtype=torch.int32)
    scale = D ** -0.5
    flop_f = 4 * sum(l * l / 2 for l in lens) * D * h
    # token index of each padded slot (the padding points at token 0; its rows are never read back)
    pos = torch.arange(longest, device=dev)
    lens_t = torch.tensor(lens, device=dev)
    real = pos[None, :] < lens_t[:, None]
    slot = torch.where(real, offs[:-1, None].long() + pos[None, :], torch.zeros_like(pos[None, :]))
    flat_real = real.flatten().nonzero().squeeze(1)

    def fa_fwd():
        return torch.ops.aten._flash_attention_forward(q, k, v, offs, offs, longest, longest, 0.0, True, False,
                                                       scale=scale)

    o, lse, rng, _, _ = fa_fwd()

    def fa_bwd():
        return torch.ops.aten._flash_attention_backward(dout, q, k, v, o, lse, offs, offs, longest, longest, 0.0, True,
                                                        rng, torch.empty(0, device=dev), scale=scale)

    ref = (o, *fa_bwd())
    gather = lambda t: t[slot].transpose(1, 2)  # [n, h, longest, D] views of [n, longest, h, D]

    def pc_fwd():
        qb, kb, vb = gather(q), gather(k), gather(v)
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(qb, kb, vb, None, True, 0.0, True, False, scale=scale)
        return (qb, kb, vb, out), out[0].transpose(1, 2).reshape(n * longest, h, D)[flat_real]

    saved, po = pc_fwd()

    def pc_bwd():
        qb, kb, vb, out = saved
        db = torch.zeros(n * longest, h, D, device=dev, dtype=bf)
        db[flat_real] = dout
        g = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            db.view(n, longest, h, D).transpose(1, 2), qb, kb, vb, out[0], out[1], out[6], out[7], None, out[2], out[3],
            longest, longest, 0.0, True, scale=scale)
        return tuple(t.transpose(1, 2).reshape(n * longest, h, D)[flat_real] for t in g)

    got = (po, *pc_bwd())
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref))
    report("flash varlen", timeit(fa_fwd), timeit(fa_bwd), flop_f)
    report("cudnn padded", timeit(pc_fwd), timeit(pc_bwd), flop_f, diff)


print(torch.__version__, "cuDNN", torch.backends.cudnn.version(), torch.cuda.get_device_name())
for lens in ([512] * 4, [512, 137, 390, 260, 512, 237], [300, 180, 420, 90, 512, 350, 200]):
    print(f"segments {lens} ({sum(lens)} tokens), heads 32, gathered into a padded batch for cuDNN:")
    padded_cudnn(lens, 32)
for total, seg, h, hkv in [(2048, 2048, 32, 32), (2048, 512, 32, 32), (2048, 256, 32, 32), (8192, 8192, 32, 32),
                           (2048, 2048, 32, 8), (2048, 512, 32, 8)]:
    print(f"tokens {total}, segments of {seg}, heads {h}/{hkv}:")
    case(total, seg, h, hkv)
sys.stdout.flush()
