"""Train the tiny R1: a small DeepSeek-V3-architecture model (with its MTP module) that reasons in
`<think>…</think>` on the checkable tasks of runtime/tasks.py, saved in the Hugging Face release layout.

    python -m r1cpu.tools.train_tiny_r1 [--out tools/data/tiny-r1] [--steps N] [--threads 1]

The main model is transformers' own DeepseekV3ForCausalLM (MLA with q-LoRA and YaRN, a dense first
layer, sigmoid-scored MoE with group-limited routing, shared experts), so the architecture is the
reference. The MTP module (deepseek-math.md §8) is added here, trained jointly on the next-next token
and saved as layer `num_hidden_layers`, as DeepSeek releases it. The routing bias is balanced
aux-loss-free style: after each step every router's bias moves by ±gamma toward equal expert load.

Output folder: config.json, model.safetensors (BF16 with per-expert names, like the releases),
tokenizer.json (the R1 tokenizer trimmed, digits kept one per token), tokenizer_config.json (R1's,
with its chat template), train_log.json and loss.png. Needs torch and transformers (`.[train]`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3DecoderLayer,
    DeepseekV3RMSNorm,
    DeepseekV3TopkRouter,
)

from r1cpu.runtime import tasks
from r1cpu.tools.make_checkpoint import (
    TINY_V3,
    TOKENIZERS,
    TokenizerFiles,
    config_dict,
    shard_weights,
)
from r1cpu.tools.safetensors_io import TensorSpec, f32_to_bf16, write_safetensors
from r1cpu.tools.trim_tokenizer import _merge_parts, dumps, trim_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "tiny-r1"
VOCAB_KEEP = 1000
ROW_LEN = 256  # tokens per packed training row: the longest example is about 200; attention cost grows as ROW_LEN²
# transformers' default 0.02 leaves the attention of a 128-wide model near uniform for hundreds of steps
# (copying digits from the question was not learned in 400 steps); ~1/sqrt(hidden) learns it in ~100.
INIT_STD = 0.08

TINY_R1 = replace(
    TINY_V3, vocab_keep=VOCAB_KEEP,
    hidden=128, heads=8, q_lora=64, kv_lora=64, nope=16, rope=16, v=16,
    layers=4, first_dense=1, dense_ff=384, moe_ff=96,
    experts=8, top_k=2, shared=1, n_group=4, topk_group=2,
    # YaRN as in V3 (scaled frequencies and mscale); the tasks stay within its original 256 tokens.
    rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 256,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    max_pos=1024, mtp=1, layers_per_shard=None,
)  # fmt: skip


@dataclass(frozen=True)
class Hyper:
    steps: int = 5000  # about 55 min of one CPU thread
    batch: int = 8  # rows of ROW_LEN tokens, about 17 examples
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    mtp_weight: float = 0.3  # DeepSeek-V3 used 0.3 for most of training
    bias_gamma: float = 1e-3  # aux-loss-free bias update speed
    seed: int = 0


# ---------------------------------------------------------------- tokenizer


def build_tokenizer() -> tuple[dict, str]:
    """R1's tokenizer trimmed to VOCAB_KEEP BPE entries, without merges that join digits.

    One token per digit keeps each column of the worked arithmetic a single token (the R1
    pre-tokenizer would otherwise group up to three digits into whatever merges exist)."""
    folder = TOKENIZERS / "deepseek-r1"
    tok = trim_tokenizer(json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")), VOCAB_KEEP)
    tok["model"]["merges"] = [m for m in tok["model"]["merges"] if not "".join(_merge_parts(m)).isdigit()]
    return tok, (folder / "tokenizer_config.json").read_text(encoding="utf-8")


def tokenizer_files(tok: dict, config_text: str) -> TokenizerFiles:
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    tok_config = json.loads(config_text)
    bos, eos = (ids[tok_config[k]["content"]] for k in ("bos_token", "eos_token"))
    return TokenizerFiles(dumps(tok), config_text, bos, eos, 1 + max(ids.values()))


class Encoder:
    """Chat-template rendering (as transformers would) and encoding of tasks."""

    def __init__(self, tok_files: TokenizerFiles):
        self.tok = Tokenizer.from_str(tok_files.tokenizer_json)
        cfg = json.loads(tok_files.config_json)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(cfg["chat_template"])
        self.bos, self.eos = cfg["bos_token"]["content"], cfg["eos_token"]["content"]
        self.eos_id = tok_files.eos_id

    def prompt(self, task: tasks.Task) -> list[int]:
        text = self.template.render(messages=task.messages(), add_generation_prompt=True,
                                    bos_token=self.bos, eos_token=self.eos)  # fmt: skip
        return self.tok.encode(text, add_special_tokens=False).ids

    def example(self, task: tasks.Task) -> tuple[list[int], int]:
        """Prompt + response + EOS token ids, and the prompt length (no loss on the prompt)."""
        prompt = self.prompt(task)
        response = self.tok.encode(task.response, add_special_tokens=False).ids
        return prompt + response + [self.eos_id], len(prompt)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def batches(enc: Encoder, hp: Hyper):
    """(ids, positions, target) batches of `hp.batch` rows of ROW_LEN tokens, each row packed with
    whole examples from the stream, so every batch mixes the task kinds (about a fifth is padding).
    Positions restart at 0 for each example, which is also how transformers finds the examples and
    masks attention between them."""
    stream, carried = tasks.train_stream(hp.seed), None
    while True:
        rows = []
        for _ in range(hp.batch):
            row, carried = _pack_row(enc, stream, carried)
            rows.append(row)
        yield tuple(torch.stack(parts) for parts in zip(*rows))


def _pack_row(enc: Encoder, stream, carried):
    """One row: examples while they fit, then padding as one more (untargeted) sequence."""
    ids, pos, target = [], [], []
    example = carried or enc.example(next(stream))
    while len(ids) + len(example[0]) <= ROW_LEN:
        seq, n_prompt = example
        ids += seq
        pos += range(len(seq))
        target += [False] * n_prompt + [True] * (len(seq) - n_prompt)
        example = enc.example(next(stream))
    pad = ROW_LEN - len(ids)
    ids, pos, target = ids + [enc.eos_id] * pad, pos + list(range(pad)), target + [False] * pad
    row = (torch.tensor(ids), torch.tensor(pos), torch.tensor(target))
    return row, example


def _single(enc: Encoder, task: tasks.Task):
    """One example as a batch of one: (ids, positions, target)."""
    seq, n_prompt = enc.example(task)
    target = torch.arange(len(seq)) >= n_prompt
    return torch.tensor([seq]), torch.arange(len(seq))[None], target[None]


# ---------------------------------------------------------------- model


class MTP(nn.Module):
    """DeepSeek's multi-token-prediction module, depth 1 (deepseek-math.md §8).

    z_i = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]), u = block(z), logits = lm_head(shared_head.norm(u))
    predicts t_{i+2}; h is the main model's output after model.norm. Embedding and head are the main
    model's (saved as copies). Parameter names match the release layout under `model.layers.{L}.`."""

    def __init__(self, config):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.enorm, self.hnorm = DeepseekV3RMSNorm(D, eps), DeepseekV3RMSNorm(D, eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        # layer_idx = num_hidden_layers >= first_k_dense_replace, so the block is MoE, as released.
        self.block = DeepseekV3DecoderLayer(config, config.num_hidden_layers)
        self.shared_head = nn.ModuleDict({"norm": DeepseekV3RMSNorm(D, eps)})

    def forward(self, h, next_embeds, position_embeddings, mask):  # (B, T, D) each -> (B, T, D)
        z = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(h)], dim=-1))
        u = self.block(z, attention_mask=mask, position_embeddings=position_embeddings)
        return self.shared_head["norm"](u)


def build_model(out: Path, tok_files: TokenizerFiles, seed: int):
    """Write config.json into `out` and instantiate the model from it, as a loader would."""
    torch.manual_seed(seed)
    cfg = config_dict(TINY_R1, TINY_R1.layers, tok_files)
    cfg["initializer_range"] = INIT_STD
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    config = AutoConfig.from_pretrained(out)
    config._attn_implementation = "sdpa"
    model = DeepseekV3ForCausalLM(config)
    mtp = MTP(config)
    mtp.apply(model._init_weights)
    return model, mtp


def forward_hidden(model, mtp, ids, pos) -> tuple[torch.Tensor, torch.Tensor]:
    """Main output h (B, T, D) after model.norm, where h_i predicts t_{i+1}, and MTP output u (B, T-1, D),
    where u_i predicts t_{i+2}."""
    h = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    rope = model.model.rotary_emb(h, pos[:, :-1])
    u = mtp(h[:, :-1], model.model.embed_tokens(ids[:, 1:]), rope, _packed_causal(pos[:, :-1]))
    return h, u


def forward_losses(model, mtp, ids, pos, target) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the next token (main) and of the next-next token (MTP) on targets."""
    h, u = forward_hidden(model, mtp, ids, pos)
    main = _masked_ce(model.lm_head, h[:, :-1], ids[:, 1:], target[:, 1:])
    nxt = _masked_ce(model.lm_head, u[:, :-1], ids[:, 2:], target[:, 2:])
    return main, nxt


def _packed_causal(pos) -> torch.Tensor:
    """Additive mask (B, 1, T, T): causal within each packed example (positions restart at 0)."""
    seq = (pos == 0).cumsum(-1)
    T = pos.shape[1]
    allowed = (seq[:, :, None] == seq[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None]


def _masked_ce(head, h, labels, mask) -> torch.Tensor:
    # The head only on target positions: prompts and padding are about 40% of a packed batch.
    return F.cross_entropy(head(h[mask]), labels[mask])


class BiasBalancer:
    """Aux-loss-free load balancing (DeepSeek-V3 §2.1.2): overloaded experts' bias -= gamma, others +=."""

    def __init__(self, modules, gamma: float):
        self.routers = [m for root in modules for m in root.modules() if isinstance(m, DeepseekV3TopkRouter)]
        self.gamma, self.picked = gamma, {}
        for r in self.routers:
            r.register_forward_hook(self._record)

    def _record(self, router, _inputs, outputs):
        self.picked[router] = outputs[2].detach().reshape(-1)  # topk_indices

    @torch.no_grad()
    def update(self) -> float:
        """Apply one update; returns the worst max/mean load ratio seen (1.0 = balanced)."""
        worst = 0.0
        for r in self.routers:
            load = torch.bincount(self.picked[r], minlength=r.num_experts).float()
            r.e_score_correction_bias += self.gamma * torch.sign(load.mean() - load)
            worst = max(worst, float(load.max() / load.mean()))
        return worst


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def generate(model, enc: Encoder, batch: list[tasks.Task], max_new: int) -> list[str]:
    """Greedy completions (text after the generation prompt) of a batch, left-padded."""
    prompts = [enc.prompt(t) for t in batch]
    T = max(map(len, prompts))
    ids = torch.tensor([[enc.eos_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                         eos_token_id=enc.eos_id, pad_token_id=enc.eos_id)  # fmt: skip
    texts = []
    for row in out[:, T:].tolist():
        texts.append(enc.decode(row[: row.index(enc.eos_id)] if enc.eos_id in row else row))
    return texts


def task_accuracy(model, enc: Encoder, heldout: list[tasks.Task], batch: int = 64) -> dict[str, float]:
    """Held-out accuracy per kind (greedy, chat template, answer after </think>) and overall."""
    model.eval()
    max_new = max(len(enc.example(t)[0]) - len(enc.prompt(t)) for t in heldout) + 16
    right: dict[str, list[bool]] = {}
    for i in range(0, len(heldout), batch):
        chunk = heldout[i : i + batch]
        for task, text in zip(chunk, generate(model, enc, chunk, max_new)):
            right.setdefault(task.kind, []).append(tasks.is_correct(task, text))
    model.train()
    acc = {kind: sum(r) / len(r) for kind, r in right.items()}
    acc["all"] = sum(map(sum, right.values())) / len(heldout)
    return acc


@torch.no_grad()
def teacher_forced_accuracy(model, mtp, enc: Encoder, heldout: list[tasks.Task]) -> dict[str, float]:
    """Argmax accuracy on the held-out responses of the next token (main) and of the next-next token
    (MTP, given the true next token), and how often the MTP draft equals the main model's own greedy
    choice one step later: the acceptance rate of one-token self-speculative greedy decoding."""
    hits, n = torch.zeros(3), 0
    for task in heldout:
        ids, pos, target = _single(enc, task)
        h, u = forward_hidden(model, mtp, ids, pos)
        main = model.lm_head(h[:, 1:-1]).argmax(-1)  # all three scored on tokens 2.. of the row
        draft = model.lm_head(u[:, :-1]).argmax(-1)
        keep = target[:, 2:]
        right = torch.stack([main == ids[:, 2:], draft == ids[:, 2:], draft == main])
        hits += right[:, keep].sum(-1)
        n += int(keep.sum())
    keys = ("next_token", "mtp_next_next_token", "mtp_draft_accepted")
    return {k: round(float(v / n), 4) for k, v in zip(keys, hits)}


# ---------------------------------------------------------------- release layout


def _unfused(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers 5 fuses experts into gate_up_proj [E, 2F, D] / down_proj [E, D, F]; releases do not."""
    if name.endswith("experts.gate_up_proj"):
        pre, F_ = name.removesuffix("gate_up_proj"), t.shape[1] // 2
        return {f"{pre}{e}.{k}.weight": w for e in range(t.shape[0])
                for k, w in (("gate_proj", t[e, :F_]), ("up_proj", t[e, F_:]))}  # fmt: skip
    if name.endswith("experts.down_proj"):
        pre = name.removesuffix("down_proj")
        return {f"{pre}{e}.down_proj.weight": t[e] for e in range(t.shape[0])}
    return {name: t}


def release_tensors(model, mtp) -> dict[str, torch.Tensor]:
    """Every tensor under its DeepSeek release name; the MTP module is layer num_hidden_layers."""
    out = {}
    for name, t in model.state_dict().items():
        out.update(_unfused(name, t))
    pre = f"model.layers.{model.config.num_hidden_layers}."
    for name, t in mtp.state_dict().items():
        out.update(_unfused(pre + name.removeprefix("block."), t))
    out[pre + "embed_tokens.weight"] = out["model.embed_tokens.weight"]
    out[pre + "shared_head.head.weight"] = out["lm_head.weight"]
    expected = {w.name: w.shape for shard in shard_weights(TINY_R1, TINY_R1.layers, model.config.vocab_size)
                for w in shard}  # fmt: skip
    got = {k: tuple(v.shape) for k, v in out.items()}
    if got != expected:
        raise RuntimeError(f"not the release layout: {sorted(set(got.items()) ^ set(expected.items()))[:8]}")
    return out


def save_checkpoint(out: Path, model, mtp, tok_files: TokenizerFiles) -> None:
    """model.safetensors in BF16 (the router bias in F32, as released) plus the tokenizer files."""
    specs = []
    for name, t in release_tensors(model, mtp).items():
        x = t.detach().float().contiguous().numpy()
        if name.endswith("e_score_correction_bias"):
            specs.append(TensorSpec(name, x.shape, "F32", lambda x=x: iter([x])))
        else:
            specs.append(TensorSpec(name, x.shape, "BF16", lambda x=x: iter([f32_to_bf16(x)])))
    write_safetensors(out / "model.safetensors", specs)
    (out / "tokenizer.json").write_text(tok_files.tokenizer_json, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(tok_files.config_json, encoding="utf-8")


def _fused(saved: dict, name: str, like: torch.Tensor) -> torch.Tensor:
    """Inverse of _unfused: a transformers-layout tensor gathered from release-named ones."""
    if name.endswith("experts.gate_up_proj"):
        pre = name.removesuffix("gate_up_proj")
        return torch.stack([torch.cat([saved[f"{pre}{e}.gate_proj.weight"], saved[f"{pre}{e}.up_proj.weight"]])
                            for e in range(like.shape[0])])  # fmt: skip
    if name.endswith("experts.down_proj"):
        pre = name.removesuffix("down_proj")
        return torch.stack([saved[f"{pre}{e}.down_proj.weight"] for e in range(like.shape[0])])
    return saved[name]


def load_checkpoint(ckpt: Path):
    """The saved folder back through transformers (float32), plus the MTP module from its tensors."""
    from safetensors.torch import load_file

    model, info = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
    pre = f"model.layers.{model.config.num_hidden_layers}."
    # transformers loads everything but the MTP layer, which it only knows to skip as layer 61.
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(pre)]
    if info["missing_keys"] or info["mismatched_keys"] or unexpected:
        raise RuntimeError(f"{ckpt}: loading problems {info}")
    saved = load_file(ckpt / "model.safetensors")
    mtp = MTP(model.config)
    state = {n: _fused(saved, pre + n.removeprefix("block."), t).float() for n, t in mtp.state_dict().items()}
    mtp.load_state_dict(state)
    return model.eval(), mtp.eval()


# ---------------------------------------------------------------- training


def lr_at(step: int, hp: Hyper) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < hp.warmup:
        return hp.lr * (step + 1) / hp.warmup
    progress = (step - hp.warmup) / max(1, hp.steps - hp.warmup)
    return hp.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(model, mtp, enc: Encoder, hp: Hyper, eval_set: list[tasks.Task], eval_every: int, save) -> dict:
    """The training loop; every `eval_every` steps, held-out accuracy and `save()` (a checkpoint to look at)."""
    params = [*model.parameters(), *mtp.parameters()]
    opt = torch.optim.AdamW(params, lr=hp.lr, betas=(0.9, 0.95), weight_decay=hp.weight_decay)
    balancer = BiasBalancer([model, mtp], hp.bias_gamma)
    log, data = {"step": [], "loss": [], "mtp_loss": [], "evals": []}, batches(enc, hp)
    t0, cpu0 = time.time(), time.process_time()  # wall and CPU time differ on a shared machine
    model.train(), mtp.train()
    for step in range(hp.steps):
        ids, pos, target = next(data)
        main, nxt = forward_losses(model, mtp, ids, pos, target)
        opt.zero_grad(set_to_none=True)
        (main + hp.mtp_weight * nxt).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, hp)
        opt.step()
        imbalance = balancer.update()
        log["step"].append(step)
        log["loss"].append(round(main.item(), 5)), log["mtp_loss"].append(round(nxt.item(), 5))
        if step % 25 == 0 or step == hp.steps - 1:
            print(f"step {step:5d}  loss {main.item():.4f}  mtp {nxt.item():.4f}  lr {lr_at(step, hp):.2e}  "
                  f"max/mean expert load {imbalance:.2f}  {time.time() - t0:.0f} s ({time.process_time() - cpu0:.0f} s CPU)",
                  flush=True)  # fmt: skip
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < hp.steps:
            acc = task_accuracy(model, enc, eval_set)
            log["evals"].append({"step": step + 1, **acc})
            print(f"step {step + 1:5d}  held-out accuracy " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()),
                  flush=True)  # fmt: skip
            save()
    log["seconds"], log["cpu_seconds"] = time.time() - t0, time.process_time() - cpu0
    return log


def plot(log: dict, path: Path) -> None:
    """Loss curves (a 25-step running mean), if matplotlib is installed (`pip install -e .[train]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "next token (main)"), ("mtp_loss", "next-next token (MTP)")):
        y = torch.tensor(log[key])
        smooth = y.unfold(0, 25, 1).mean(1) if len(y) >= 25 else y
        ax.plot(range(len(y) - len(smooth), len(y)), smooth.tolist(), label=label)
    ax.set(xlabel="step", ylabel="cross-entropy on responses", yscale="log", title="tiny R1 training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint folder (files replaced)")
    parser.add_argument("--steps", type=int, default=Hyper.steps)
    parser.add_argument("--batch", type=int, default=Hyper.batch)
    parser.add_argument("--lr", type=float, default=Hyper.lr)
    parser.add_argument("--seed", type=int, default=Hyper.seed)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--eval-every", type=int, default=1000, help="steps between held-out evaluations")
    parser.add_argument("--eval-n", type=int, default=8, help="held-out questions per kind during training")
    parser.add_argument("--final-n", type=int, default=50, help="held-out questions per kind at the end")
    parser.add_argument("--eval-only", action="store_true", help="only score the checkpoint in --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hp = Hyper(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    tok_files = tokenizer_files(*build_tokenizer())
    enc = Encoder(tok_files)
    if args.eval_only:
        print(json.dumps(evaluate_saved(args.out, enc, args.final_n)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    model, mtp = build_model(args.out, tok_files, hp.seed)
    n_params = sum(p.numel() for p in [*model.parameters(), *mtp.parameters()])
    print(f"tiny R1: {n_params / 1e6:.2f} M parameters (main + MTP), {hp}", flush=True)
    save = lambda: save_checkpoint(args.out, model, mtp, tok_files)  # noqa: E731
    log = train(model, mtp, enc, hp, tasks.heldout_tasks(args.eval_n), args.eval_every, save)
    save()
    final = evaluate_saved(args.out, enc, args.final_n)
    log.update(final=final, hyper=asdict(hp), n_params=n_params)
    (args.out / "train_log.json").write_text(json.dumps(log) + "\n")
    plot(log, args.out / "loss.png")
    print(f"trained in {log['seconds'] / 60:.1f} min ({log['cpu_seconds'] / 60:.1f} min CPU); final {json.dumps(final)}")


def evaluate_saved(ckpt: Path, enc: Encoder, n: int) -> dict:
    """Metrics of the checkpoint as saved (BF16 weights), loaded back through transformers."""
    model, mtp = load_checkpoint(ckpt)
    heldout = tasks.heldout_tasks(n)
    return {"task_accuracy": task_accuracy(model, enc, heldout), **teacher_forced_accuracy(model, mtp, enc, heldout)}


if __name__ == "__main__":
    main()
