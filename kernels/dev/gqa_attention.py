"""Grouped-query attention (Llama-3: 32 query heads over 8 key/value heads) on the step's backends, timed and checked
(docs/performance.md): k and v repeated to every query head first (HF's repeat_kv, what the trainer's plain causal
path did: a copy each way and the heads' gradients summed back), against cuDNN's attention and flash attention
taking the grouped k and v as they are. q, k, v are views of one [T, H + 2 Hkv, D] buffer as the trainer's RoPE
split leaves them, seen as [1, n, T, D]. Prints forward + backward ms and the largest differences of each path's
output and gradients from the repeated path's. Run: python3 kernels/dev/gqa_attention.py (needs a GPU).
"""
import torch

from cuda_timing import cuda_ms

dev, bf, D = torch.device("cuda"), torch.bfloat16, 128


def repeat_kv(x, rep):  # [B, nkv, T, D] -> [B, nkv rep, T, D], as llama.cpp's
    b, n, t, d = x.shape
    return x.unsqueeze(2).expand(b, n, rep, t, d).reshape(b, n * rep, t, d)


def case(t, h, hkv):
    torch.manual_seed(0)
    qkv = torch.randn(t, h + 2 * hkv, D, device=dev, dtype=bf)
    q, k, v = (x.unsqueeze(0).transpose(1, 2) for x in (qkv[:, :h], qkv[:, h:h + hkv], qkv[:, h + hkv:]))
    dout = torch.randn(1, t, h, D, device=dev, dtype=bf).transpose(1, 2)
    scale = D ** -0.5
    rep = h // hkv

    def cudnn(qq, kk, vv):
        return torch.ops.aten._scaled_dot_product_cudnn_attention(qq, kk, vv, None, True, 0.0, True, False, scale=scale)

    def run(path):
        """forward + backward of one path through autograd; returns (out, dq, dk, dv)."""
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        if path == "cudnn, k v repeated":
            out = cudnn(qq, repeat_kv(kk, rep), repeat_kv(vv, rep))[0]
        elif path == "cudnn, grouped":
            out = cudnn(qq, kk, vv)[0]
        else:  # flash attention 2, grouped
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale,
                                                                       enable_gqa=True)
        out.backward(dout)
        return out, qq.grad, kk.grad, vv.grad

    ref = run("cudnn, k v repeated")
    print(f"T {t}, {h} query heads over {hkv} key/value heads, D {D}")
    for path in ("cudnn, k v repeated", "cudnn, grouped", "flash, grouped"):
        try:
            got = run(path)
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref))
            shapes = "dk " + "x".join(map(str, got[2].shape))
            ms = cuda_ms(lambda: run(path), iters=20, warmup=3)
            print(f"  {path:22s} fwd+bwd {ms:6.3f} ms  max|diff| {diff:.3g}  {shapes}")
        except Exception as ex:  # noqa: BLE001: report what this torch/cuDNN refuses
            print(f"  {path:22s} {type(ex).__name__}: {str(ex).splitlines()[0][:160]}")


if __name__ == "__main__":
    for t in (2048, 8192):
        case(t, 32, 8)
