"""`qlora quantize` against torch and bitsandbytes (reference: make_ptq_fixture.py -> $QLORA_TEST_DATA/ptq).

1. Numbers: for every case of ref.json, `$QLORA_CLI quantize model <args> --json` must report every weight
   with the reference's numbers. Both sides dequantize to the same float32 values (same arithmetic, op for
   op; any differing element shows up far above the tolerances below), then widen to float64:
     - mse and sqnr are float64 sums of n <= 16384 non-negative terms taken in different orders; the
       relative error of such a sum is at most (n - 1) * 2^-53 ~ 1.8e-12, so mse gets rtol 1e-10 and sqnr
       (10 log10 of a ratio of two such sums: 4.34 * 2 * 1.8e-12 dB) atol 1e-9 dB;
     - max_abs_error is the max of the same float64 differences: exact; bytes are integers: exact, and
       bits_per_param = 8 * bytes / n is the same float64 division on both sides: exact.
2. --out nf4 (+ double quant) and fp4: bitsandbytes reads the checkpoint (QuantState.from_dict) and its
   dequantization (portable path, and the public F.dequantize_4bit where its CPU kernel is right) equals bnb's
   own quantize-then-dequantize of the original weight, bit for bit; the packed codes equal bnb's; every other
   tensor is the original; config.json carries quantization_config. For nf4, transformers.from_pretrained
   loads the directory as a bitsandbytes 4-bit model holding our state (logits within bf16 accuracy).
3. --out int8: weight / weight_scale / weight_zero_point equal torch's int_repr / scales / zero points.
4. Errors: unknown scheme, bad block size, missing model dir, existing --out without --overwrite.
Exits non-zero on any failure.
"""
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # see make_ptq_fixture.py
import torch  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.functional import QuantState  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "quant"))
sys.path.insert(0, HERE)
from bnb_ref import generic_dequant  # noqa: E402
from make_ptq_fixture import int8_ref  # noqa: E402
from checks import Checks  # noqa: E402

DIR = os.path.join(os.environ["QLORA_TEST_DATA"], "ptq")
MODEL = os.path.join(DIR, "model")
CLI = os.environ["QLORA_CLI"]
MSE_RTOL, SQNR_ATOL = 1e-10, 1e-9

check = Checks(passes=False)


def cli(*args):
    return subprocess.run([CLI, "quantize", *args], capture_output=True, text=True)


def compare_numbers(tmp):
    ref = json.load(open(os.path.join(DIR, "ref.json")))
    worst = {"mse": 0.0, "sqnr_db": 0.0, "max_abs_error": 0.0}
    for case, spec in ref["cases"].items():
        out = os.path.join(tmp, case + ".json")
        r = cli(MODEL, *spec["args"], "--json", out)
        check(r.returncode == 0, f"{case}: exit {r.returncode}: {r.stderr}")
        if r.returncode:
            continue
        got = {l["name"]: l for l in json.load(open(out))["layers"]}
        check(sorted(got) == sorted(spec["layers"]), f"{case}: weights {sorted(got)} != {sorted(spec['layers'])}")
        for name, want in spec["layers"].items():
            g = got.get(name)
            if g is None:
                continue
            where = f"{case} {name}"
            check(g["shape"] == want["shape"] and g["numel"] == want["numel"], f"{where}: shape {g['shape']}")
            check(g["bytes"] == want["bytes"], f"{where}: bytes {g['bytes']} != {want['bytes']}")
            check(g["bits_per_param"] == want["bits_per_param"], f"{where}: bits {g['bits_per_param']} != "
                  f"{want['bits_per_param']}")
            d_mse = abs(g["mse"] - want["mse"]) / want["mse"]
            d_max = abs(g["max_abs_error"] - want["max_abs_error"])
            d_sqnr = abs(g["sqnr_db"] - want["sqnr_db"])
            worst["mse"] = max(worst["mse"], d_mse)
            worst["max_abs_error"] = max(worst["max_abs_error"], d_max)
            worst["sqnr_db"] = max(worst["sqnr_db"], d_sqnr)
            check(d_mse <= MSE_RTOL, f"{where}: mse {g['mse']!r} vs {want['mse']!r} (rel {d_mse:.2e})")
            check(d_max == 0, f"{where}: max_abs_error {g['max_abs_error']!r} vs {want['max_abs_error']!r}")
            check(d_sqnr <= SQNR_ATOL, f"{where}: sqnr {g['sqnr_db']!r} vs {want['sqnr_db']!r} ({d_sqnr:.2e} dB)")
        print(f"{case}: {len(spec['layers'])} weights compared")
    print(f"largest differences over every case and weight: mse rel {worst['mse']:.3e}, "
          f"max_abs_error {worst['max_abs_error']:.3e}, sqnr {worst['sqnr_db']:.3e} dB")


def original():
    return load_file(os.path.join(MODEL, "model.safetensors"))


def is_proj(name):
    return any(f".{p}." in name for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def check_transformers_load(tag, out, deq):
    """transformers + bitsandbytes load the --out directory as a 4-bit model whose every Linear4bit holds our
    state, and its logits follow a float32 model built from bnb's dequantization of that state. bnb 0.50.2's
    CPU Linear4bit forward computes in bfloat16 (u = 2^-8 = 3.9e-3; see tests/quant/make_bnb_llama.py): a few
    u per layer over 2 layers, ~1e-2, bounded at 5e-2 (a wrong weight gives O(1))."""
    from transformers import LlamaForCausalLM
    q = LlamaForCausalLM.from_pretrained(out, device_map="cpu").eval()
    ref = LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    n = 0
    for name, mod in q.named_modules():
        if name + ".weight" in deq:
            check(type(mod).__name__ == "Linear4bit", f"{tag}: transformers loaded {name} as {type(mod).__name__}")
            got = generic_dequant(mod.weight.data, mod.weight.quant_state, torch.float32)
            check(torch.equal(got, deq[name + ".weight"]), f"{tag}: transformers' {name} differs from our state")
            ref.get_submodule(name).weight.data.copy_(deq[name + ".weight"])
            n += 1
    check(n == len(deq), f"{tag}: transformers loaded {n} 4-bit projections, expected {len(deq)}")
    ids = torch.randint(0, ref.config.vocab_size, (2, 13))
    with torch.no_grad():
        a, b = q(ids).logits.float(), ref(ids).logits.float()
    err = ((a - b).norm() / b.norm()).item()
    check(err < 5e-2, f"{tag}: transformers' 4-bit logits vs the dequantized float32 model: relative error {err}")
    print(f"{tag}: transformers loads it ({n} Linear4bit); logits vs dequantized float32 model: rel {err:.2e}")


def check_out_4bit(tmp, quant_type, dq, bs, with_transformers=False):
    tag = f"--out {quant_type} bs{bs}{' dq' if dq else ''}"
    out = os.path.join(tmp, f"out_{quant_type}_{bs}_{int(dq)}")
    args = ["--scheme", quant_type, "--block-size", str(bs), "--out", out] + (["--double-quant"] if dq else [])
    r = cli(MODEL, *args)
    check(r.returncode == 0, f"{tag}: exit {r.returncode}: {r.stderr}")
    if r.returncode:
        return
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    check(qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == quant_type
          and qc["bnb_4bit_use_double_quant"] == dq, f"{tag}: quantization_config {qc}")
    check(os.path.exists(os.path.join(out, "generation_config.json")), f"{tag}: generation_config.json not copied")
    sd, orig = load_file(os.path.join(out, "model.safetensors")), original()
    n, deq = 0, {}
    for name, w in orig.items():
        if not (is_proj(name) and name.endswith(".weight")):
            check(name in sd and torch.equal(sd[name], w), f"{tag}: {name} is not the original tensor")
            continue
        entries = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        state = QuantState.from_dict(entries, device=torch.device("cpu"))
        packed = sd[name]
        check(state.quant_type == quant_type and state.blocksize == bs and state.nested == dq and
              list(state.shape) == list(w.shape) and state.dtype == w.dtype, f"{tag}: {name}: state {state.as_dict()}")
        ref_packed, ref_state = F.quantize_4bit(w, blocksize=bs, quant_type=quant_type, compress_statistics=dq)
        check(torch.equal(packed, ref_packed), f"{tag}: {name}: packed codes differ from bnb's")
        want = generic_dequant(ref_packed, ref_state, torch.float32)
        got = generic_dequant(packed, state, torch.float32)
        check(torch.equal(got, want), f"{tag}: {name}: bnb's dequantization of our state differs from bnb's own")
        deq[name] = want
        if w.shape[-1] % bs == 0:  # bnb's public CPU kernel is right only when blocks do not straddle rows
            state.dtype = torch.float32
            pub = F.dequantize_4bit(packed, state)
            check(torch.equal(pub + 0.0, want + 0.0), f"{tag}: {name}: F.dequantize_4bit differs")
        n += 1
    print(f"{tag}: {n} projections read back by bitsandbytes, bit-identical to its own quantization")
    if with_transformers:
        check_transformers_load(tag, out, deq)


def check_out_int8(tmp, symmetric, per_channel):
    scheme = "int8-sym" if symmetric else "int8-asym"
    tag = f"--out {scheme} {'per channel' if per_channel else 'per tensor'}"
    out = os.path.join(tmp, f"out_{scheme}_{int(per_channel)}")
    r = cli(MODEL, "--scheme", scheme, "--out", out, *(["--per-channel"] if per_channel else []))
    check(r.returncode == 0, f"{tag}: exit {r.returncode}: {r.stderr}")
    if r.returncode:
        return
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    check(qc == {"quant_method": "qlora-ptq", "scheme": scheme, "zero_point_dtype": "uint8",
                 "granularity": "per_channel" if per_channel else "per_tensor"}, f"{tag}: quantization_config {qc}")
    sd, orig = load_file(os.path.join(out, "model.safetensors")), original()
    n = 0
    for name, w in orig.items():
        if not (is_proj(name) and name.endswith(".weight")):
            check(torch.equal(sd[name], w), f"{tag}: {name} is not the original tensor")
            continue
        _, _, want = int8_ref(w, symmetric, per_channel)
        q, scale = sd[name], sd[name + "_scale"]
        check(q.dtype == (torch.int8 if symmetric else torch.uint8), f"{tag}: {name}: dtype {q.dtype}")
        check(torch.equal(q, want["q"]), f"{tag}: {name}: codes differ from torch's int_repr()")
        check(torch.equal(scale, want["scale"].reshape(scale.shape)) and scale.dim() == int(per_channel),
              f"{tag}: {name}: scale {scale} vs torch {want['scale']}")
        if symmetric:
            check(name + "_zero_point" not in sd, f"{tag}: {name}: symmetric scheme stored a zero point")
        else:
            zp = sd[name + "_zero_point"]
            check(zp.dtype == torch.uint8 and torch.equal(zp.long(), want["zero_point"].long().reshape(zp.shape)),
                  f"{tag}: {name}: zero point {zp} vs torch {want['zero_point']}")
        n += 1
    print(f"{tag}: {n} projections equal torch's quantized tensors")


def check_errors(tmp):
    cases = [
        (["--scheme", "int4"], ["unknown quantization scheme 'int4'", "int8-sym, int8-asym, nf4, fp4"]),
        (["--scheme", "nf4", "--block-size", "48"], ["unsupported block size 48", "power of two in [32, 4096]"]),
        (["--scheme", "int8-sym", "--block-size", "64"], ["--block-size applies to the 4-bit schemes"]),
        (["--scheme", "nf4", "--per-channel"], ["--per-channel applies to the int8 schemes"]),
    ]
    for args, needles in cases:
        r = cli(MODEL, *args)
        check(r.returncode != 0 and all(s in r.stderr for s in needles), f"{args}: rc {r.returncode}: {r.stderr!r}")
    missing = os.path.join(tmp, "no_such_model")
    r = cli(missing, "--scheme", "nf4")
    check(r.returncode != 0 and f"model directory {missing} does not exist" in r.stderr, f"missing dir: {r.stderr!r}")
    out = os.path.join(tmp, "existing")
    os.makedirs(out)
    open(os.path.join(out, "keep.txt"), "w").write("x")
    r = cli(MODEL, "--scheme", "nf4", "--out", out)
    check(r.returncode != 0 and "already exists; pass --overwrite" in r.stderr, f"existing --out: {r.stderr!r}")
    check(os.path.exists(os.path.join(out, "keep.txt")), "existing --out was touched without --overwrite")
    r = cli(MODEL, "--scheme", "nf4", "--out", out, "--overwrite")
    check(r.returncode == 0 and not os.path.exists(os.path.join(out, "keep.txt")) and
          os.path.exists(os.path.join(out, "model.safetensors")), f"--overwrite: rc {r.returncode} {r.stderr!r}")
    print("error cases checked")


def main():
    with tempfile.TemporaryDirectory(prefix="qlora_ptq_") as tmp:
        compare_numbers(tmp)
        check_out_4bit(tmp, "nf4", True, 64, with_transformers=True)
        check_out_4bit(tmp, "fp4", False, 128)
        check_out_int8(tmp, True, True)
        check_out_int8(tmp, False, False)
        check_out_int8(tmp, False, True)
        check_errors(tmp)
    return check.report()


if __name__ == "__main__":
    sys.exit(main())
