"""Fixture: safetensors files written by the reference Python library, for the C++ reader to load.

Writes into $QLORA_TEST_DATA/io/py/:
  all_dtypes.safetensors  one random tensor per dtype, plus scalars (shape []) and empty tensors, metadata
  one_meta.safetensors    a few tensors and a single metadata key (the C++ writer must reproduce it byte
                          for byte: metadata order is then unambiguous)
  empty.safetensors       no tensors at all
  sharded/                a Hugging Face sharded checkpoint (huggingface_hub's splitter + save_file +
                          model.safetensors.index.json written the way transformers writes it)
  manifest.json           per file / checkpoint: metadata and, per tensor, dtype name, shape and the
                          sha256 of its raw little-endian C-order bytes, computed here in Python.
"""
import hashlib
import json
import os
import sys

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import load_file, save_file

OUT = os.path.join(os.environ["QLORA_TEST_DATA"], "io", "py")
os.makedirs(OUT, exist_ok=True)
gen = torch.Generator().manual_seed(1234)

NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
    torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def rand(dtype, shape):
    """Random bytes reinterpreted as dtype (every bit pattern, NaNs included: we compare bytes)."""
    n = 1
    for d in shape:
        n *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=gen).bool().reshape(shape)
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape).clone()


def raw_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def describe(tensors):
    return {k: {"dtype": NAMES[v.dtype], "shape": list(v.shape), "sha256": hashlib.sha256(raw_bytes(v)).hexdigest()}
            for k, v in tensors.items()}


manifest = {"files": {}, "checkpoints": {}}


def write(name, tensors, metadata=None):
    path = os.path.join(OUT, name)
    save_file(tensors, path, metadata=metadata)
    # The library must give back what we gave it; otherwise the manifest would describe the wrong thing.
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and raw_bytes(back[k]) == raw_bytes(tensors[k]), k
    with safe_open(path, "pt") as f:
        assert (f.metadata() or {}) == (metadata or {})
    manifest["files"][name] = {"metadata": metadata or {}, "tensors": describe(tensors)}


shapes = [(3, 5), (7,), (2, 3, 4)]
all_dtypes = {}
for i, (dt, nm) in enumerate(NAMES.items()):
    all_dtypes[f"t.{nm.lower()}"] = rand(dt, shapes[i % len(shapes)])
    all_dtypes[f"scalar.{nm.lower()}"] = rand(dt, ())
all_dtypes["empty.f32"] = torch.empty(0, 3, dtype=torch.float32)
all_dtypes["empty.bf16"] = torch.empty(4, 0, dtype=torch.bfloat16)
all_dtypes["odd.u8"] = rand(torch.uint8, (13,))  # odd byte counts stress alignment of what follows
write("all_dtypes.safetensors", all_dtypes, {"format": "pt", "note": "grüße, \"quoted\" \\ and\nnewline"})

write("one_meta.safetensors",
      {"w": rand(torch.float32, (4, 3)), "b": rand(torch.bfloat16, (3,)), "m": rand(torch.bool, (5,)),
       "s": rand(torch.int64, ())},
      {"format": "pt"})
write("empty.safetensors", {})

# Sharded checkpoint: names like a tiny Llama so the loader-facing API is exercised realistically.
state = {"model.embed_tokens.weight": rand(torch.bfloat16, (64, 16)), "model.norm.weight": rand(torch.float32, (16,)),
         "lm_head.weight": rand(torch.bfloat16, (64, 16))}
for layer in range(3):
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        state[f"model.layers.{layer}.self_attn.{proj}.weight"] = rand(torch.bfloat16, (16, 16))
split = split_torch_state_dict_into_shards(state, max_shard_size=2000)
assert split.is_sharded and len(split.filename_to_tensors) >= 3, split.filename_to_tensors.keys()
sdir = os.path.join(OUT, "sharded")
os.makedirs(sdir, exist_ok=True)
for fname, names in split.filename_to_tensors.items():
    save_file({n: state[n] for n in names}, os.path.join(sdir, fname), metadata={"format": "pt"})
with open(os.path.join(sdir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2, sort_keys=True)
manifest["checkpoints"]["sharded"] = {"shards": sorted(split.filename_to_tensors), "tensors": describe(state),
                                      "weight_map": split.tensor_to_filename}

with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
print(f"wrote {len(manifest['files'])} files and {len(manifest['checkpoints'])} checkpoint(s) to {OUT}")
sys.exit(0)
