"""LoRA fine-tuning of a GGUF base model on CPU (or GPU), and export to llama.cpp's adapter format.

Training runs on the dequantized GGUF through transformers (`gguf_file=`) and peft, so the adapter is
learned against the very weights llama.cpp runs. Export writes llama.cpp's LoRA GGUF: tensors
`blk.N.<name>.weight.lora_a` / `.lora_b`, no transpose, float32. One step decides whether the adapter is
right: llama.cpp's converter permutes the rows of llama's q and k weights for its rotary layout, so the
`lora_b` rows of q and k are permuted the same way (`permute_rows`); without it the adapter loads without
error and is quietly wrong (tests/test_finetune.py compares logits to catch exactly that).

Needs the optional extra: pip install 'kb-assistant[train]' (torch, transformers, peft, gguf).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from kb.adapters import SUPPORTED_ARCHITECTURES, UnsupportedModel, adapters_dir, file_sha256
from kb.errors import KBError

TRAIN_EXTRA_HINT = "install the training extra: .venv/bin/pip install -e '.[train]' (or pip install 'kb-assistant[train]')"

# peft module name -> llama.cpp tensor name
LLAMA_TENSORS = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}


@dataclass
class TrainConfig:
    name: str
    base: str = ""  # empty: the bundled GGUF
    steps: int = 0  # 0: from epochs
    epochs: float = 3.0
    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-4
    batch: int = 4
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    max_len: int = 0  # 0: 512 tokens, or for `rag` data the context its prompts were packed into
    seed: int = 0
    threads: int = 0
    checkpoint_every: int = 25


def require_training_libraries():
    try:
        import gguf  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise KBError(f"fine-tuning needs {e.name}, which is not installed", hint=TRAIN_EXTRA_HINT) from e


def gguf_metadata(path: Path) -> dict:
    """A few fields of a GGUF header: architecture, head counts, chat template."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def get(key, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = get("general.architecture", "")
    return {
        "architecture": arch,
        "n_head": get(f"{arch}.attention.head_count"),
        "n_head_kv": get(f"{arch}.attention.head_count_kv") or get(f"{arch}.attention.head_count"),
        "chat_template": get("tokenizer.chat_template"),
        "name": get("general.name", path.stem),
    }


def check_architecture(meta: dict, path: Path) -> None:
    if meta["architecture"] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"fine-tuning {meta['architecture'] or 'this'} models is not supported yet ({path.name})",
            hint=f"kb converts LoRA adapters for {', '.join(SUPPORTED_ARCHITECTURES)}-family GGUFs only for now",
        )


def permute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, interleaved rotary halves become consecutive."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def export_gguf_adapter(lora_state: dict, out: Path, *, architecture: str, alpha: float, n_head: int,
                        n_head_kv: int, permute_qk: bool = True) -> None:
    """Write a peft LoRA state dict as a llama.cpp LoRA adapter (float32)."""
    import gguf

    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, tensor in lora_state.items():
        m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$", key)
        if not m or m.group(2) not in LLAMA_TENSORS:
            continue
        array = tensor.detach().float().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor, np.float32)
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = array
    if not pairs:
        raise KBError("the trained model holds no LoRA weights kb can export")
    tmp = out.with_suffix(".gguf.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=architecture)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for (layer, module), ab in sorted(pairs.items()):
        a, b = ab["A"], ab["B"]
        if permute_qk and module == "q_proj":
            b = permute_rows(b, n_head)
        elif permute_qk and module == "k_proj":
            b = permute_rows(b, n_head_kv)
        name = f"blk.{layer}.{LLAMA_TENSORS[module]}.weight"
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)


def load_base(path: Path, threads: int = 0):
    """(model, tokenizer) of a GGUF file, dequantized to float32 by transformers."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF de-quantization draws its own progress bar
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
    return model, tokenizer


def encode_example(messages: list[dict], template, tokenizer, max_len: int) -> tuple[list[int], list[int]] | None:
    """Token ids and labels for one chat example; the loss covers only the last (assistant) turn."""
    if not messages or messages[-1].get("role") != "assistant":
        return None
    specials = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    prompt = template.render(messages=messages[:-1], add_generation_prompt=True, **specials)
    full = template.render(messages=messages, add_generation_prompt=False, **specials)
    if not full.startswith(prompt):  # a template that renders history differently: train on the whole text
        prompt = ""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
    full_ids, labels = full_ids[:max_len], labels[:max_len]
    if all(x == -100 for x in labels):
        return None
    return full_ids, labels


def training_precision(device: str) -> str:
    """bf16 autocast where the hardware computes in bf16 (CUDA with bf16, CPUs with AVX512-BF16 or AMX: about
    2.5x faster per step here, the same loss to 3 decimals), else fp32. The LoRA weights stay in fp32.
    KB_TRAIN_PRECISION=fp32 turns it off."""
    import torch

    if os.environ.get("KB_TRAIN_PRECISION", "").lower() == "fp32":
        return "fp32"
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bf16" if native else "fp32"


def batch_loss(model, batch: list[tuple[list[int], list[int]]], pad: int, device: str, precision: str = "fp32"):
    """The mean cross-entropy over the labelled (answer) tokens of a right-padded batch. Logits are computed
    only from the first labelled position on: a retrieval-aware example is a long prompt and a short answer,
    and the vocabulary projection of every prompt position was a third of the step for nothing."""
    import torch
    import torch.nn.functional as F

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch], device=device)
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch], device=device)
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=device)
    first = min(next(i for i, x in enumerate(lab) if x != -100) for _, lab in batch)
    keep_from = max(first - 1, 0)  # the position whose logits predict the first labelled token
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=width - keep_from).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, keep_from + 1:].reshape(-1),
                           ignore_index=-100)


def schedule(n_examples: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """The example indices of every step: one shuffled pass after another, the same on every resume."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        epoch = list(range(n_examples))
        rng.shuffle(epoch)
        order += epoch
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


def _save_checkpoint(run: Path, model, optimizer, step: int, losses: list[float]) -> None:
    import torch

    tmp = run / "checkpoint.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    with warnings.catch_warnings():  # peft looks for a config.json that a GGUF base does not have
        warnings.filterwarnings("ignore", message="Could not find a config file")
        model.save_pretrained(str(tmp), save_embedding_layers=False)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "losses": losses}, tmp / "state.pt")
    (tmp / "progress.json").write_text(json.dumps({"step": step}))  # readable without torch (kb adapters)
    final = run / "checkpoint"
    old = run / "checkpoint.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _data_meta(data: Path) -> dict:
    """What `kb dataset build` recorded beside the data: its kind and, for `rag`, the prompt templates' hash."""
    try:
        meta = json.loads(Path(f"{data}.meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"kind": "general"}
    return {"kind": meta.get("kind", "general"), "prompt_template_sha256": meta.get("prompt_template_sha256"),
            "n_ctx": meta.get("n_ctx")}


def finetune(home: Path, data: str | Path | None, config: TrainConfig, *, resume: bool = False,
             progress=None) -> dict:
    """Train (or resume) adapter `config.name`; returns its card. `progress(step, total, loss)` is called per step."""
    from kb.dataset import read_examples
    from kb.generator import compile_chat_template, resolve_model

    require_training_libraries()
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    folder = adapters_dir(home)
    run = folder / f"{config.name}.run"
    if resume:
        if not (run / "config.json").is_file():
            raise KBError(f"no stopped fine-tuning run named {config.name!r}", hint="`kb adapters` lists runs")
        saved = json.loads((run / "config.json").read_text())
        config = TrainConfig(**saved["config"])
        data = saved["data"]
    elif (folder / f"{config.name}.gguf").exists() or run.exists():
        raise KBError(f"an adapter or run named {config.name!r} exists already",
                      hint=f"pick another --name, resume it with --resume {config.name}, or `kb adapters rm {config.name}`")
    if not data:
        raise KBError("no training data given", hint="kb finetune DATA.jsonl --name NAME")
    data = Path(data).resolve()
    base = resolve_model(config.base or None, home)
    meta = gguf_metadata(base)
    check_architecture(meta, base)
    examples = read_examples(data).examples
    data_meta = _data_meta(data)
    if not config.max_len:
        config = replace(config, max_len=int(data_meta.pop("n_ctx", None) or 512))
    data_meta.pop("n_ctx", None)
    data_hash = file_sha256(data)
    if resume and data_hash != saved["data_sha256"]:
        raise KBError(f"{data} changed since the run started", hint="start a new run with another --name")
    template = compile_chat_template(meta["chat_template"], base.name)
    model, tokenizer = load_base(base, config.threads)
    encoded = [e for e in (encode_example(m, template, tokenizer, config.max_len) for m in examples) if e]
    too_long = len(examples) - len(encoded)
    if not encoded:
        raise KBError(f"{data} has no usable example (each needs a final assistant message)",
                      hint=f"check it with `kb dataset check {data}`")
    steps = config.steps or max(1, math.ceil(config.epochs * len(encoded) / config.batch))
    folder.mkdir(parents=True, exist_ok=True)
    run.mkdir(exist_ok=True)
    if not resume:
        (run / "config.json").write_text(json.dumps(
            {"config": asdict(config), "data": str(data), "data_sha256": data_hash}, indent=2))
    torch.manual_seed(config.seed)
    start, losses = 0, []
    if resume and (run / "checkpoint").is_dir():
        model = PeftModel.from_pretrained(model, str(run / "checkpoint"), is_trainable=True)
        state = torch.load(run / "checkpoint" / "state.pt", weights_only=False, map_location="cpu")
        start, losses = state["step"], state["losses"]
    else:
        model = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                                 target_modules=list(config.targets), bias="none",
                                                 task_type="CAUSAL_LM"))
        state = None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = training_precision(device)
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    plan = schedule(len(encoded), config.batch, steps, config.seed)
    model.train()
    started = time.time()
    step_seconds: list[float] = []
    step = start
    try:
        for step in range(start, steps):
            step_started = time.perf_counter()
            loss = batch_loss(model, [encoded[i] for i in plan[step]], pad, device, precision)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(round(float(loss.detach()), 4))
            step_seconds.append(round(time.perf_counter() - step_started, 3))
            if progress:
                progress(step + 1, steps, losses[-1])
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < steps:
                _save_checkpoint(run, model, optimizer, step + 1, losses)
        step = steps
    except KeyboardInterrupt:
        _save_checkpoint(run, model, optimizer, len(losses), losses)
        raise
    out = folder / f"{config.name}.gguf"
    with warnings.catch_warnings():  # peft looks for a config.json that a GGUF base does not have
        warnings.filterwarnings("ignore", message="Could not find a config file")
        lora_state = get_peft_model_state_dict(model)
    export_gguf_adapter(lora_state, out, architecture=meta["architecture"],
                        alpha=config.alpha, n_head=meta["n_head"], n_head_kv=meta["n_head_kv"])
    card = {
        "name": config.name,
        "base_model": str(base),
        "base_model_name": base.name,
        "base_sha256": file_sha256(base, home),
        "data": str(data),
        "data_sha256": data_hash,
        "examples": len(encoded),
        "examples_skipped": too_long,  # no assistant turn, or its prompt alone fills max_len
        "max_len": config.max_len,
        "steps": steps,
        "rank": config.rank,
        "alpha": config.alpha,
        "lr": config.lr,
        "batch": config.batch,
        "targets": list(config.targets),
        "loss_curve": losses,
        "final_loss": round(float(np.mean(losses[-10:])), 4) if losses else None,
        "seconds_this_session": round(time.time() - started, 1),
        "step_seconds_this_session": step_seconds,
        "device": device,
        "precision": precision,
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        **data_meta,
    }
    (folder / f"{config.name}.json").write_text(json.dumps(card, indent=2))
    shutil.rmtree(run, ignore_errors=True)
    return card


__all__ = ["TrainConfig", "finetune", "export_gguf_adapter", "permute_rows", "gguf_metadata", "load_base",
           "encode_example", "require_training_libraries", "TRAIN_EXTRA_HINT"]
