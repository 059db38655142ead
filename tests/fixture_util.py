"""Helpers shared by the Python fixture scripts (tests/<stage>/make_*.py), which ctest runs with
tests/ on PYTHONPATH (tests/CMakeLists.txt, QLORA_TEST_ENV).

  spread_weights(model)      weights ~ N(0, std) (2-D) and norms ~ U(0.5, 1.5), larger than HF's init
                             so that logits are not all near zero (a weak test)
  randomize_lora_b(model)    every lora_B drawn N(0, 0.1^2): PEFT starts B at zero, which would leave the
                             branches out of the logits and every lora_A gradient at zero (a weak test)
  our_name(peft_name)        PEFT's parameter name -> ours (trainer/lora/peft.h)
  scratch_dir(prefix)        a fresh temp directory, removed when the script exits (as test_util's temp_dir)
  tiny_cuda_bench(work, name, *args)  `qlora bench` on the tiny shape on CUDA: its JSON figures
  free_port()                a TCP port free on the loopback interface now (a rendezvous for test ranks)
"""
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import torch


def spread_weights(model, std=0.08, std_of=None):
    """In place, without autograd. std_of(name) may give a parameter its own std (None: the default)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                s = std_of(name) if std_of else None
                p.normal_(0.0, std if s is None else s)
            else:
                p.uniform_(0.5, 1.5)
    return model


def randomize_lora_b(peft_model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return peft_model


def our_name(peft_name):
    # "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    #   -> "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert peft_name.startswith("base_model.model."), peft_name
    return peft_name[len("base_model.model."):].replace(".default.", ".")


def free_port():
    """A TCP port the loopback interface has free now (the tests' MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_dir(prefix):
    """A fresh directory under the system temp dir, removed when the process exits (they piled up in /tmp
    over runs); QLORA_KEEP_TEST_DIRS=1 keeps it to look at."""
    path = tempfile.mkdtemp(prefix=prefix)
    if not os.environ.get("QLORA_KEEP_TEST_DIRS"):
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def tiny_cuda_bench(work, name, *args):
    """`$QLORA_CLI bench` on the tiny shape on CUDA (seq 256, batch 2, then args: options not given above), its
    JSON in work/name.json; exits the test, printing the bench's output, if the bench fails."""
    out = os.path.join(work, name + ".json")
    p = subprocess.run([os.environ["QLORA_CLI"], "bench", "--shape", "tiny", "--device", "cuda", "--seq", "256",
                        "--batch", "2", "--json", out, *args], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        print(p.stdout, p.stderr)
        sys.exit(f"{name}: bench failed ({p.returncode})")
    with open(out) as f:
        return json.load(f)
