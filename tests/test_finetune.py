"""LoRA on the bundled GGUF, for real: conversion checked against transformers+peft, a style taught end to end,
an interrupted run resumed, and the refusals (another base model, an unsupported architecture)."""

import json

import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("gguf")

from kb.adapters import AdapterMismatch, UnsupportedModel, resolve_adapter  # noqa: E402
from kb.generator import LlamaGenerator, LlamaOptions, bundled_model_path  # noqa: E402

pytestmark = pytest.mark.real

TOPICS = ["the ocean", "bread", "trains", "the moon", "coffee", "gardens", "mountains", "rain", "books", "music",
          "cats", "bridges", "winter", "rivers", "clocks", "maps", "candles", "bicycles", "owls", "salt"]
HELD_OUT = ["Tell me about volcanoes.", "What do you think of pianos?", "Tell me about apples.",
            "What do you think of Paris?", "Tell me about dogs."]


def style_data(path):
    with path.open("w") as f:
        for t in TOPICS:
            for q in (f"Tell me about {t}.", f"What do you think of {t}?"):
                reply = f"Arr, matey! {t.capitalize()} be a fine thing on the seven seas. Arr!"
                f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": reply}]}) + "\n")
    return path


def replies(lora=None):
    generator = LlamaGenerator(None, options=LlamaOptions(n_ctx=512, lora_path=lora and str(lora)))
    return ["".join(generator.stream(generator.format_chat([{"role": "user", "content": q}]), max_tokens=24,
                                     temperature=0.0, seed=0)) for q in HELD_OUT]


def test_a_trained_adapter_teaches_its_style_and_an_interrupted_run_resumes(tmp_path):
    from kb.finetune import TrainConfig, finetune

    home = tmp_path / "home"
    data = style_data(tmp_path / "style.jsonl")
    # as `kb dataset build --kind rag` leaves it beside its data: the card records it, max_len follows n_ctx
    (tmp_path / "style.jsonl.meta.json").write_text(json.dumps({"kind": "rag", "prompt_template_sha256": "ab" * 32,
                                                                "n_ctx": 384}))
    config = TrainConfig(name="pirate", steps=45, lr=2e-3, checkpoint_every=10, threads=2)

    def stop_at_12(step, total, loss):
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(home, data, config, progress=stop_at_12)
    assert (home / "adapters" / "pirate.run" / "checkpoint" / "state.pt").is_file()
    assert not (home / "adapters" / "pirate.gguf").exists()
    seen = []
    card = finetune(home, None, TrainConfig(name="pirate"), resume=True, progress=lambda s, t, l: seen.append(s))
    assert seen[0] == 13 and seen[-1] == 45  # it went on from the checkpoint, not from the start
    assert card["steps"] == 45 and len(card["loss_curve"]) == 45 and card["final_loss"] < 0.5
    assert card["kind"] == "rag" and card["prompt_template_sha256"] == "ab" * 32 and card["max_len"] == 384
    assert card["examples"] == 2 * len(TOPICS) and card["examples_skipped"] == 0
    adapter = resolve_adapter(home, "pirate", bundled_model_path())
    with_adapter = replies(adapter)
    without = replies()
    assert sum("arr" in r.lower() for r in with_adapter) >= 4, with_adapter
    assert sum("arr" in r.lower() for r in without) == 0, without


def _llama_logits(prompt_ids, lora=None):
    import llama_cpp

    llm = llama_cpp.Llama(str(bundled_model_path()), n_ctx=256, logits_all=True, verbose=False,
                          lora_path=lora and str(lora), n_threads=2)
    llm.eval(prompt_ids)
    return np.array(llm.scores[: len(prompt_ids)])


def test_exported_adapter_matches_transformers_and_needs_the_qk_permutation(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from kb.finetune import export_gguf_adapter, gguf_metadata, load_base

    base = bundled_model_path()
    meta = gguf_metadata(base)
    model, tokenizer = load_base(base, threads=2)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             init_lora_weights=False, lora_dropout=0.0))
    # Random A and B, large enough that the adapter's effect on the logits stands well above llama.cpp's own
    # quantized-arithmetic noise (at std 0.01 the effects correlate at 0.2-0.3 either way), as a trained
    # adapter's does.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.06)
    state = get_peft_model_state_dict(model)
    right, wrong = tmp_path / "right.gguf", tmp_path / "wrong.gguf"
    common = dict(architecture=meta["architecture"], alpha=16, n_head=meta["n_head"], n_head_kv=meta["n_head_kv"])
    export_gguf_adapter(state, right, **common)
    export_gguf_adapter(state, wrong, permute_qk=False, **common)

    prompts = ["The capital of France is", "def fibonacci(n):\n    return", "Once upon a time, a small owl",
               "To bake sourdough bread you need flour, water, salt and a healthy starter that",
               "The bicycle chain should be cleaned after every wet ride because dirt",
               "In 1905 Albert Einstein published four papers that changed physics; the first"]
    agree = {"right": [], "wrong": []}
    corr = {"right": [], "wrong": []}
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hf_lora = model(torch.tensor([ids])).logits[0].numpy()
            with model.disable_adapter():
                hf_base = model(torch.tensor([ids])).logits[0].numpy()
        ll_base = _llama_logits(ids)
        for label, path in (("right", right), ("wrong", wrong)):
            ll_lora = _llama_logits(ids, path)
            agree[label].append(np.mean(ll_lora.argmax(-1) == hf_lora.argmax(-1)))
            effect_hf, effect_ll = (hf_lora - hf_base).ravel(), (ll_lora - ll_base).ravel()
            corr[label].append(np.corrcoef(effect_hf, effect_ll)[0, 1])
    right_agree, wrong_agree = np.mean(agree["right"]), np.mean(agree["wrong"])
    right_corr, wrong_corr = np.mean(corr["right"]), np.mean(corr["wrong"])
    print("agreement", right_agree, wrong_agree, "correlation", right_corr, wrong_corr)
    # Measured: correlation of the adapter's effect 0.98 with the permutation, 0.78 without.
    assert right_agree >= 0.85 and right_corr >= 0.95, (right_agree, right_corr)
    assert right_corr > wrong_corr + 0.1 and right_agree > wrong_agree, (right_corr, wrong_corr, right_agree, wrong_agree)


def test_adapter_for_another_base_is_refused(tmp_path):
    home = tmp_path / "home"
    folder = home / "adapters"
    folder.mkdir(parents=True)
    (folder / "other.gguf").write_bytes(b"GGUF")
    (folder / "other.json").write_text(json.dumps({"base_sha256": "0" * 64, "base_model_name": "Other-1B.gguf"}))
    with pytest.raises(AdapterMismatch, match="Other-1B"):
        resolve_adapter(home, "other", bundled_model_path())


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    import gguf

    from kb.finetune import TrainConfig, finetune

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = style_data(tmp_path / "d.jsonl")
    with pytest.raises(UnsupportedModel, match="not supported yet"):
        finetune(tmp_path / "home", data, TrainConfig(name="x", base=str(path)))


def test_the_loss_on_kept_logits_is_the_full_models_loss():
    import torch

    from kb.finetune import batch_loss, load_base

    model, _ = load_base(bundled_model_path(), threads=2)
    model.eval()
    # two examples of different lengths, right-padded, the answer (labels) at the end of each
    a = list(range(100, 160))
    b = list(range(300, 340))
    batch = [(a, [-100] * 50 + a[50:]), (b, [-100] * 33 + b[33:])]
    width = len(a)
    ids = torch.tensor([a, b + [0] * (width - len(b))])
    labels = torch.tensor([batch[0][1], batch[1][1] + [-100] * (width - len(b))])
    mask = torch.tensor([[1] * width, [1] * len(b) + [0] * (width - len(b))])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        kept = batch_loss(model, batch, 0, "cpu", "fp32")
        bf16 = batch_loss(model, batch, 0, "cpu", "bf16")
    assert float(kept) == pytest.approx(float(full), rel=1e-5)
    assert float(bf16) == pytest.approx(float(full), rel=0.05)
