"""Reference data for export / generate / eval, computed by transformers + PEFT + bitsandbytes + sentencepiece.

Writes under $QLORA_TEST_DATA/export/:
  base/            tiny random LlamaForCausalLM, float32, dims multiples of 64 (bnb's CPU dequantization is
                   wrong otherwise), with tokenizer.model (SentencePiece BPE, 320 pieces, byte fallback)
  base_notok/      the same weights without a tokenizer (error tests)
  base_bnb/        the base quantized and saved by transformers + bitsandbytes (NF4 + double quant)
  adapter/         PEFT LoRA adapter r 8, alpha 16, all seven projections, B drawn at random
  ckpt/            a resume checkpoint of the same adapter: trainable.safetensors (our names) + config.yaml
  adapter_badtarget/   adapter/ whose adapter_config.json also targets "w_gate" (no such module)
  adapter_badshape/    a PEFT adapter made on a base with hidden_size 128 (shapes do not fit base/)
  ref.safetensors
      input_ids [2, T] int64, attention_mask [2, T] int64 (row 1 right-padded)
      logits_peft [2, T, V] float32      PEFT(base, adapter), eval
      logits_base [2, T, V] float32      the base alone
  generate.json    prompts (Llama-2 chat prompts as ids) and transformers' generate(do_sample=False) ids:
      {"max_new_tokens", "prompts": [[ids]], "base": [[ids]], "adapter": [[ids]],
       "stop": {"prompt": i, "eos": id, "ids": [...]}}   (generation with eos_token_id = a token the greedy
       continuation emits mid-way, to check stopping: the stop token is included, nothing after it)
  eval.jsonl, eval.json   records and the report `qlora eval` must produce (loss from PEFT, exact match)
"""
import json
import os
import random
import shutil

import sentencepiece as spm
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from fixture_util import our_name, randomize_lora_b, spread_weights

OUT = os.path.join(os.environ["QLORA_TEST_DATA"], "export")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
V = 320
MAX_NEW = 12
WORDS = ("the a model learns quickly slowly river mountain town cat dog parrot red blue green lives in has "
         "where what which does is of colour pet favourite people valley answer question short sentence "
         "one two three four five six seven eight nine ten").split()


def llama_cfg(hidden=64):
    return LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       attn_implementation="sdpa")


def random_model(seed, hidden=64):
    torch.manual_seed(seed)
    # lm_head larger so greedy choices are decisive (no near-ties that rounding could flip)
    m = spread_weights(LlamaForCausalLM(llama_cfg(hidden)).eval(), std_of=lambda n: 0.25 if "lm_head" in n else None)
    with torch.no_grad():
        # <unk> and the 256 byte-fallback pieces (ids 3..258) never win: generations are words, whose
        # text survives strip() the same way in Python and C++ (not control bytes / U+FFFD).
        m.lm_head.weight[0].zero_()
        m.lm_head.weight[3:259].zero_()
    return m


def make_adapter(base_path, path, seed):
    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = randomize_lora_b(get_peft_model(base, cfg), seed + 100)
    model.save_pretrained(path)
    return model


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    rng = random.Random(7)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(400)]
    corpus += ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
    import io
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="bpe", vocab_size=V, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    assert sp.get_piece_size() == V

    base_path = os.path.join(OUT, "base")
    model = random_model(0)
    model.save_pretrained(base_path)
    with open(os.path.join(base_path, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    model.save_pretrained(os.path.join(OUT, "base_notok"))

    # bitsandbytes quantizes while loading and serializes on save.
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
    q = LlamaForCausalLM.from_pretrained(base_path, quantization_config=bnb_cfg, device_map="cpu",
                                         dtype=torch.float32)
    q.save_pretrained(os.path.join(OUT, "base_bnb"))
    shutil.copy(os.path.join(base_path, "tokenizer.model"), os.path.join(OUT, "base_bnb", "tokenizer.model"))

    adapter_path = os.path.join(OUT, "adapter")
    peft_model = make_adapter(base_path, adapter_path, 1)

    # Resume-checkpoint form of the same adapter (our parameter names, see trainer/lora/peft.h).
    ckpt = os.path.join(OUT, "ckpt")
    os.makedirs(ckpt)
    tr = {}
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            tr[our_name(n)] = p.detach().float().contiguous()
    save_file(tr, os.path.join(ckpt, "trainable.safetensors"))
    with open(os.path.join(ckpt, "config.yaml"), "w") as f:
        f.write(f"method: lora\nmodel:\n  path: {base_path}\nlora:\n  r: 8\n  alpha: 16\n  dropout: 0.0\n"
                f"  target_modules: [{', '.join(TARGETS)}]\ndata:\n  train_file: unused.jsonl\n")
    with open(os.path.join(ckpt, "state.json"), "w") as f:
        json.dump({"format_version": 1, "step": 1}, f)

    bad = os.path.join(OUT, "adapter_badtarget")
    shutil.copytree(adapter_path, bad)
    c = json.load(open(os.path.join(bad, "adapter_config.json")))
    c["target_modules"] = sorted(c["target_modules"]) + ["w_gate"]
    json.dump(c, open(os.path.join(bad, "adapter_config.json"), "w"))
    other = os.path.join(OUT, "base_other")
    random_model(3, hidden=128).save_pretrained(other)
    make_adapter(other, os.path.join(OUT, "adapter_badshape"), 4)

    # Logits on fixed inputs.
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                           adapter_path).eval()
    base = LlamaForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(5)
    b, t = 2, 19
    ids = torch.randint(3, V, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - 6:] = 0
    with torch.no_grad():
        ref = {"input_ids": ids, "attention_mask": mask,
               "logits_peft": peft_model(input_ids=ids, attention_mask=mask).logits.float().contiguous(),
               "logits_base": base(input_ids=ids, attention_mask=mask).logits.float().contiguous()}
    save_file(ref, os.path.join(OUT, "ref.safetensors"))

    # Greedy generation (transformers' generate, do_sample=False) on Llama-2 chat prompts.
    users = ["where does the cat live", "what is the favourite colour of the dog",
             "one two three", "which town has a river and a mountain", "the model learns"]
    prompts = []
    for i, u in enumerate(users):
        text = f"[INST] {u} [/INST]" if i != 1 else f"[INST] <<SYS>>\nanswer in one short sentence\n<</SYS>>\n\n{u} [/INST]"
        prompts.append([1] + sp.encode(text))

    def greedy(m, p, eos=2, n=MAX_NEW):
        x = torch.tensor([p])
        with torch.no_grad():
            out = m.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                             eos_token_id=eos, pad_token_id=0)
        return out[0, len(p):].tolist()

    gen = {"max_new_tokens": MAX_NEW, "prompts": prompts,
           "base": [greedy(base, p) for p in prompts], "adapter": [greedy(peft_model, p) for p in prompts]}
    cont = gen["adapter"][0]
    stop = next(tok for tok in cont[3:] if tok not in cont[:3])
    gen["stop"] = {"prompt": 0, "eos": stop, "ids": greedy(peft_model, prompts[0], eos=stop)}
    assert gen["stop"]["ids"][-1] == stop and len(gen["stop"]["ids"]) < MAX_NEW, gen["stop"]
    json.dump(gen, open(os.path.join(OUT, "generate.json"), "w"))

    # Eval records: references built from the adapter's greedy answers, so exact match is known: records
    # 0 and 1 match exactly, 2 only "contains", 3 neither; 4 has no reference (loss only), 5 has an
    # "answer" but no chat (generation only; the dataset loader skips it for the loss).
    system = "answer in one short sentence"
    ans = []
    for u in users[:4]:
        p = [1] + sp.encode(f"[INST] {u} [/INST]")
        ans.append(sp.decode(greedy(peft_model, p, n=MAX_NEW)).strip())
    ans_sys = sp.decode(greedy(peft_model, [1] + sp.encode(f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{users[0]} [/INST]"),
                               n=MAX_NEW)).strip()
    recs = [
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": users[0]},
                      {"role": "assistant", "content": ans_sys}]},
        {"messages": [{"role": "user", "content": users[1]}, {"role": "assistant", "content": "a wrong answer"}],
         "answer": ans[1]},
        {"messages": [{"role": "user", "content": users[2]}, {"role": "assistant", "content": ans[2][: len(ans[2]) // 2]}]},
        {"messages": [{"role": "user", "content": users[3]}, {"role": "assistant", "content": "the parrot has " + ans[3]}]},
        {"text": "<s>[INST] the model learns [/INST] quickly and slowly </s>"},
        {"question": "what pet does the people have", "answer": "a parrot"},
    ]
    assert ans[2][: len(ans[2]) // 2].strip() and ans[2][: len(ans[2]) // 2].strip() != ans[2]
    with open(os.path.join(OUT, "eval.jsonl"), "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")

    # The loss the dataset loader's examples give: Llama-2 template, loss on the answer tokens + EOS.
    def example(system, user, answer):
        u = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}".strip() if system else user.strip()
        head = [1] + sp.encode(f"[INST] {u} [/INST]")
        full = [1] + sp.encode(f"[INST] {u} [/INST] {answer.strip()} ") + [2]
        assert full[: len(head)] == head
        return full, [-100] * len(head) + full[len(head):]

    exs = [example(system, users[0], ans_sys), example("", users[1], "a wrong answer"),
           example("", users[2], ans[2][: len(ans[2]) // 2]), example("", users[3], "the parrot has " + ans[3])]
    ids4 = [1] + sp.encode("[INST] the model learns [/INST]")
    full4 = ids4 + sp.encode(" quickly and slowly") + [2]
    # format_text: the answer starts at the space after [/INST]; check against the text's own encoding
    enc = [1] + sp.encode("[INST] the model learns [/INST] quickly and slowly ")
    full4 = enc + [2] if enc[: len(ids4)] == ids4 else None
    assert full4 is not None
    exs.append((full4, [-100] * len(ids4) + full4[len(ids4):]))
    tot, n = 0.0, 0
    with torch.no_grad():
        for ids_, labels in exs:
            logits = peft_model(input_ids=torch.tensor([ids_])).logits[0].float()
            lab = torch.tensor(labels)
            loss = torch.nn.functional.cross_entropy(logits[:-1], lab[1:], ignore_index=-100, reduction="sum")
            tot += loss.item()
            n += int((lab[1:] != -100).sum())
    report = {"loss": tot / n, "loss_tokens": n, "loss_examples": len(exs), "examples": 5,
              "exact_match": 2 / 5, "contains": 3 / 5}
    json.dump(report, open(os.path.join(OUT, "eval.json"), "w"), indent=1)
    print("export fixtures:", report)


if __name__ == "__main__":
    main()
