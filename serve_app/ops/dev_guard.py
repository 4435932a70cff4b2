"""Builds the dev guard: a tiny Llama that answers in Qwen3Guard-Gen's exact format on Qwen3Guard's exact templates.

Trained on `corpus/guard_train.jsonl` with the loss on the verdict only, then scored on `guard_heldout.jsonl`
(phrasings and subjects never seen in training); the accuracy is written to `eval.json` beside the weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from serve_app.ops.training import CORPUS_DIR, DevModelRecipe, mark_built, new_model, train_loop
from serve_app.safety import templates

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


def answer(row: dict) -> str:
    cats = ", ".join(row["categories"]) or "None"
    out = f"Safety: {row['safety']}\nCategories: {cats}"
    if row["role"] == "response":
        out += f"\nRefusal: {row['refusal']}"
    return out


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in (CORPUS_DIR / name).read_text().splitlines() if line.strip()]


def prompt_ids(tokenizer, built, row: dict) -> list[int]:
    if row["role"] == "prompt":
        return built["prompt"].render(tokenizer, row["prompt"])
    return built["response"].render(tokenizer, row["prompt"], row["response"])


def _tokenizer(rows: list[dict], recipe: DevModelRecipe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [templates.PROMPT_TEMPLATE, templates.RESPONSE_TEMPLATE] * 20
    texts += [r["prompt"] + "\n" + r.get("response", "") + "\n" + answer(r) for r in rows]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   additional_special_tokens=[IM_START], model_max_length=recipe.context)


def _batches(tokenizer, built, rows):
    import torch

    seqs = []
    for row in rows:
        p = prompt_ids(tokenizer, built, row)
        a = tokenizer.encode(answer(row), add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append((p + a, [-100] * len(p) + a))
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    return ids, labels, mask


def build_guard(recipe: DevModelRecipe, target: Path, log) -> Path:
    import torch

    started = time.monotonic()
    target.mkdir(parents=True, exist_ok=True)
    log(f"[dev-models] building {recipe.model_id} in {target}")
    train = load(recipe.corpus)
    tokenizer = _tokenizer(train, recipe)
    tokenizer.save_pretrained(target)
    built = {"prompt": templates.TemplateTokens.build(templates.PROMPT_TEMPLATE, tokenizer),
             "response": templates.TemplateTokens.build(templates.RESPONSE_TEMPLATE, tokenizer)}
    ids, labels, mask = _batches(tokenizer, built, train)
    log(f"[dev-models] tokenizer: {len(tokenizer)} tokens; {len(train)} training rows of up to {ids.shape[1]}")
    torch.manual_seed(0)
    model = new_model(recipe, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / recipe.steps)
    gen = torch.Generator().manual_seed(0)

    def loss_at(step: int):
        pick = torch.randint(0, ids.shape[0], (32,), generator=gen)
        return model(input_ids=ids[pick], attention_mask=mask[pick], labels=labels[pick]).loss

    train_loop(model, recipe, loss_at, log, opt, sched)
    report = evaluate(model, tokenizer, built, load("guard_heldout.jsonl"))
    log(f"[dev-models] {recipe.model_id} held-out: {json.dumps(report)}")
    probe = _generate(model, tokenizer, built["prompt"].render(tokenizer, recipe.probe_prompt))
    if not probe.startswith(recipe.probe_expect):
        raise RuntimeError(f"{recipe.model_id}: probe gave {probe!r}; raise `steps` in serve_app/ops/dev_models.py")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(target, safe_serialization=True)
    (target / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    mark_built(recipe, target)
    log(f"[dev-models] {recipe.model_id} ready in {time.monotonic() - started:.0f}s")
    return target


def _generate(model, tokenizer, ids: list[int], tokens: int = 16) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def evaluate(model, tokenizer, built, rows: list[dict], batch: int = 32) -> dict:
    """Held-out scores under greedy decoding, computed teacher-forced in one pass per batch: greedy decoding
    produces a gold prefix exactly when every position's argmax is the gold token."""
    import torch

    report: dict[str, dict] = {}
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        ids, labels, mask = _batches(tokenizer, built, chunk)
        with torch.no_grad():
            pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for i, row in enumerate(chunk):
            positions = (labels[i, 1:] != -100).nonzero().flatten()
            hits = (pred[i, positions] == labels[i, positions + 1]).tolist()
            first_line = len(tokenizer.encode(answer(row).split("\n")[0], add_special_tokens=False))
            safety_ok = all(hits[:first_line])
            r = report.setdefault(row["role"], {"rows": 0, "safety_correct": 0, "exact": 0, "unsafe_rows": 0,
                                                "unsafe_flagged": 0, "safe_rows": 0, "safe_passed": 0})
            r["rows"] += 1
            r["safety_correct"] += safety_ok
            r["exact"] += all(hits)
            kind = "unsafe" if row["safety"] == "Unsafe" else "safe"
            r[f"{kind}_rows"] += 1
            r["unsafe_flagged" if kind == "unsafe" else "safe_passed"] += safety_ok
    for r in report.values():
        r["safety_accuracy"] = round(r["safety_correct"] / r["rows"], 3)
    return report
