"""Loads the safetensors files our C++ writer produced ($QLORA_TEST_DATA/io/cpp, written by test_safetensors)
with the reference Python library and checks each tensor's dtype, shape and sha256 of its raw bytes against
the manifest the C++ test computed from its inputs before saving. Also checks the on-disk conventions
Python and transformers rely on: header padded to 8 bytes, the index's total_size and weight_map.
Exits non-zero on any mismatch."""
import hashlib
import json
import os
import struct
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = os.path.join(os.environ["QLORA_TEST_DATA"], "io", "cpp")
NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
    torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
errors = []


def check(cond, msg):
    if not cond:
        errors.append(msg)


def sha(t):
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def check_file(path, metadata):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        check(n % 8 == 0, f"{path}: header length {n} not a multiple of 8")
    with safe_open(path, "pt") as f:
        check((f.metadata() or {}) == metadata, f"{path}: metadata {f.metadata()} != {metadata}")
    return load_file(path)


def compare(where, got, want):
    check(set(got) == set(want), f"{where}: names differ: {sorted(set(got) ^ set(want))}")
    for name, m in want.items():
        if name not in got:
            continue
        t = got[name]
        check(NAMES.get(t.dtype) == m["dtype"], f"{where}: {name}: dtype {t.dtype} != {m['dtype']}")
        check(list(t.shape) == m["shape"], f"{where}: {name}: shape {list(t.shape)} != {m['shape']}")
        check(sha(t) == m["sha256"], f"{where}: {name}: bytes differ")


manifest = json.load(open(os.path.join(ROOT, "manifest.json")))
for fname, m in manifest["files"].items():
    compare(fname, check_file(os.path.join(ROOT, fname), m["metadata"]), m["tensors"])

for cname, m in manifest["checkpoints"].items():
    d = os.path.join(ROOT, cname)
    index = os.path.join(d, "model.safetensors.index.json")
    got = {}
    if os.path.exists(index):
        check(not os.path.exists(os.path.join(d, "model.safetensors")), f"{d}: both index and model.safetensors")
        idx = json.load(open(index))
        shards = sorted(set(idx["weight_map"].values()))
        check(len(shards) > 1, f"{d}: expected several shards, got {shards}")
        for i, s in enumerate(shards):
            check(s == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", f"{d}: unexpected shard name {s}")
            part = check_file(os.path.join(d, s), m["metadata"])
            for name in part:
                check(idx["weight_map"].get(name) == s, f"{d}: {name} is in {s} but weight_map says "
                      f"{idx['weight_map'].get(name)}")
                check(name not in got, f"{d}: {name} in two shards")
            got.update(part)
        total = sum(t.numel() * t.element_size() for t in got.values())
        check(idx["metadata"]["total_size"] == total, f"{d}: total_size {idx['metadata']['total_size']} != {total}")
    else:
        got = check_file(os.path.join(d, "model.safetensors"), m["metadata"])
    compare(cname, got, m["tensors"])

ntensors = sum(len(m["tensors"]) for m in list(manifest["files"].values()) + list(manifest["checkpoints"].values()))
check(ntensors > 50, f"manifest lists only {ntensors} tensors")
for e in errors:
    print("FAIL:", e)
print(f"checked {ntensors} tensors in {len(manifest['files'])} files and {len(manifest['checkpoints'])} checkpoints: "
      f"{len(errors)} errors")
sys.exit(1 if errors else 0)
