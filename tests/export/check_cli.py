"""The `qlora eval` and `qlora generate` commands end to end, and the CLI's error messages.

eval: `qlora eval --model base --adapter adapter --data eval.jsonl --json OUT --max-new-tokens 12` must
report the loss transformers + PEFT computes on the same examples (answer tokens only; float32 both
sides, relative tolerance 1e-5 for a mean of 79 token losses computed in different summation orders) and
exactly the exact-match / contains fractions the fixture built in (2/5, 3/5).
generate: `--prompt-file` (JSONL, one with a system prompt) greedy ids equal transformers' generate().
errors: each failing command exits 1 and says what and where.
"""
import json
import os
import subprocess
import sys

from checks import Checks
from fixture_util import scratch_dir

D = os.path.join(os.environ["QLORA_TEST_DATA"], "export")
CLI = os.environ["QLORA_CLI"]
check = Checks()


def run(*args):
    p = subprocess.run([CLI, *args], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def main():
    tmp = scratch_dir("qlora_export_cli_")
    ref = json.load(open(os.path.join(D, "eval.json")))
    out = os.path.join(tmp, "eval.json")
    rc, so, se = run("eval", "--model", os.path.join(D, "base"), "--adapter", os.path.join(D, "adapter"),
                     "--data", os.path.join(D, "eval.jsonl"), "--json", out, "--max-new-tokens", "12")
    print(so, se[-2000:])
    check(rc == 0, "eval exits 0")
    if rc == 0:
        rep = json.load(open(out))
        rel = abs(rep["loss"] - ref["loss"]) / ref["loss"]
        print(f"eval loss ours {rep['loss']:.8f} PEFT {ref['loss']:.8f} rel {rel:.2e}")
        check(rel < 1e-5, "eval loss equals PEFT's")
        check(rep["loss_tokens"] == ref["loss_tokens"], f"loss tokens {rep['loss_tokens']} == {ref['loss_tokens']}")
        check(abs(rep["perplexity"] - 2.718281828459045 ** rep["loss"]) < 1e-9 * rep["perplexity"], "perplexity = exp(loss)")
        check(rep["examples"] == ref["examples"], f"examples {rep['examples']} == {ref['examples']}")
        check(rep["exact_match"] == ref["exact_match"], f"exact_match {rep['exact_match']} == {ref['exact_match']}")
        check(rep["contains"] == ref["contains"], f"contains {rep['contains']} == {ref['contains']}")
        check(rep["skipped_records"] == 1, "the question/answer record is skipped for the loss")

    g = json.load(open(os.path.join(D, "generate.json")))
    pf = os.path.join(tmp, "prompts.jsonl")
    users = ["where does the cat live", "what is the favourite colour of the dog"]
    with open(pf, "w") as f:
        f.write(json.dumps({"prompt": users[0]}) + "\n")
        f.write(json.dumps({"prompt": users[1], "system": "answer in one short sentence"}) + "\n")
    gj = os.path.join(tmp, "gen.json")
    rc, so, se = run("generate", "-m", os.path.join(D, "base"), "-a", os.path.join(D, "adapter"),
                     "--prompt-file", pf, "-n", "12", "--json", gj)
    print(so, se[-1000:])
    check(rc == 0, "generate exits 0")
    if rc == 0:
        res = json.load(open(gj))
        for i in range(2):
            check(res[i]["prompt_ids"] == g["prompts"][i], f"generate prompt {i}: chat template ids")
            check(res[i]["ids"] == g["adapter"][i], f"generate prompt {i}: greedy ids equal transformers'")
        check(so.splitlines()[0] == res[0]["text"], "streamed stdout is the decoded text")

    # Errors.
    rc, so, se = run("export", "--base", os.path.join(D, "base"), "--adapter", os.path.join(D, "adapter"),
                     "--out", os.path.join(D, "adapter"), "--format", "merged")
    check(rc == 1 and "already exists" in se and "--overwrite" in se, f"export onto an existing dir: {se.strip()}")
    rc, so, se = run("generate", "-m", os.path.join(D, "base_notok"), "-p", "hi")
    check(rc == 1 and "no tokenizer" in se and "base_notok/tokenizer.model" in se, f"missing tokenizer: {se.strip()}")
    rc, so, se = run("export", "--base", os.path.join(D, "base_notok"), "--adapter", os.path.join(D, "adapter"),
                     "--out", os.path.join(tmp, "m"), "--format", "merged")
    check(rc == 1 and "no tokenizer" in se, f"export without a tokenizer: {se.strip()}")
    rc, so, se = run("eval", "-m", os.path.join(D, "base"), "-a", os.path.join(D, "adapter_badtarget"),
                     "--data", os.path.join(D, "eval.jsonl"))
    check(rc == 1 and "w_gate" in se and "adapter_config.json" in se, f"adapter target not in base: {se.strip()}")
    rc, so, se = run("export", "--base", os.path.join(D, "base"), "--adapter", os.path.join(D, "adapter_badshape"),
                     "--out", os.path.join(tmp, "m2"), "--format", "adapter")
    check(rc == 1 and "shape" in se and "adapter_model.safetensors" in se, f"adapter shape misfit: {se.strip()}")
    check(not os.path.exists(os.path.join(tmp, "m2")), "no output left behind after a failed export")

    return check.report()


if __name__ == "__main__":
    sys.exit(main())
