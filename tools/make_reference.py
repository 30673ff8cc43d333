"""Reference logits of the tiny presets from Hugging Face transformers (float32, eager, CPU).

    python tools/make_reference.py --out tests/fixtures/reference [--presets P ...]
    python tools/make_reference.py --check [--out tests/fixtures/reference]

Each `<preset>.npz` holds `tokens` int32 [64], `logits` float32 [64, vocab], `weights_sha256`
(make_checkpoint.checkpoint_sha256: the checkpoint's *.safetensors files), `config_sha256` (its
config.json) and the `transformers_version` / `torch_version` that produced it. Needs torch and
transformers (`pip install -e .[reference]`).

FP8 weights are dequantized here, W = fp8 * scale_inv per 128x128 block with partial edge blocks,
and loaded as float32: transformers 5.24's own FP8 loader rejects edge blocks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from r1cpu.tools.make_checkpoint import FP8_BLOCK, checkpoint_sha256, make_checkpoint

TINY_PRESETS = ("tiny-v3", "tiny-v3-fp8", "tiny-v2", "tiny-moonlight")
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference"
N_TOKENS = 64  # past original_max_position_embeddings = 32 of the YaRN presets
CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nsimple\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3? Explain briefly."},
]
# The model's "answer", so the sequence ends in ordinary text after the generation prompt.
CONTINUATION = (
    "Okay, the user wants 3+3. Adding three and three gives six, so the answer is 6. "
    "Let me double-check: 3, 4, 5, 6. Yes, the sum is 6.\n</think>\n\n3 + 3 = 6."
)


def prompt_tokens(ckpt: Path) -> np.ndarray:
    """The chat rendered with the checkpoint's template (as transformers would), then encoded."""
    tok_config = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(tok_config["chat_template"]).render(
        messages=CHAT,
        add_generation_prompt=True,
        bos_token=tok_config["bos_token"]["content"],
        eos_token=tok_config["eos_token"]["content"],
    )
    ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(text + CONTINUATION).ids
    if len(ids) < N_TOKENS:
        raise ValueError(f"prompt has only {len(ids)} tokens")
    return np.array(ids[:N_TOKENS], dtype=np.int32)


def dequantized_copy(ckpt: Path, out: Path) -> Path:
    """A float32 copy of an FP8 checkpoint, without scale_inv tensors or quantization_config."""
    out.mkdir()
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    for path in sorted(ckpt.glob("*.safetensors")):
        tensors = load_file(path)
        dense = {}
        for name, w in tensors.items():
            if name.endswith("_scale_inv"):
                continue
            scale = tensors.get(name + "_scale_inv")
            if scale is not None:
                full = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
                w = w.float() * full[: w.shape[0], : w.shape[1]]
            dense[name] = w.float().contiguous()
        save_file(dense, out / path.name, metadata={"format": "pt"})
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        (out / index.name).write_bytes(index.read_bytes())
    return out


def load_model(ckpt: Path, config: dict) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    # The MTP layer (index num_hidden_layers) is the only thing transformers may leave unused;
    # transformers 5 ignores it silently only when it is layer 61.
    mtp = f"model.layers.{config['num_hidden_layers']}."
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(mtp)]
    if info["missing_keys"] or info["mismatched_keys"] or unexpected:
        raise RuntimeError(f"{ckpt}: loading problems {info}")
    return model.eval()


def reference(preset: str) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(preset, Path(tmp) / "ckpt")
        config = json.loads((ckpt / "config.json").read_text())
        hf_dir = (
            dequantized_copy(ckpt, Path(tmp) / "f32") if "quantization_config" in config else ckpt
        )
        tokens = prompt_tokens(ckpt)
        with torch.no_grad():
            logits = load_model(hf_dir, config)(torch.from_numpy(tokens).long()[None]).logits[0]
        return {
            "tokens": tokens,
            "logits": logits.float().numpy(),
            "weights_sha256": np.str_(checkpoint_sha256(ckpt)),
            "config_sha256": np.str_(
                hashlib.sha256((ckpt / "config.json").read_bytes()).hexdigest()
            ),
            "transformers_version": np.str_(transformers.__version__),
            "torch_version": np.str_(torch.__version__),
        }


def compare(live: dict[str, np.ndarray], committed: dict[str, np.ndarray]) -> list[str]:
    """Differences that matter; empty when the committed fixture is still right."""
    problems = [
        f"{key} differs"
        for key in ("weights_sha256", "config_sha256", "tokens")
        if not np.array_equal(live[key], committed[key])
    ]
    if live["logits"].shape != committed["logits"].shape:
        return problems + ["logits shape differs"]
    diff = float(np.max(np.abs(live["logits"] - committed["logits"])))
    if not np.allclose(live["logits"], committed["logits"], rtol=1e-5, atol=1e-5):
        problems.append(f"logits differ (max abs diff {diff:.3g})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=FIXTURES, help="fixture folder")
    parser.add_argument("--presets", nargs="+", default=TINY_PRESETS, choices=TINY_PRESETS)
    parser.add_argument("--check", action="store_true", help="compare live logits with --out")
    args = parser.parse_args(argv)
    failed = False
    for preset in args.presets:
        live = reference(preset)
        path = args.out / f"{preset}.npz"
        if args.check:
            with np.load(path) as committed:
                problems = compare(live, dict(committed))
            failed |= bool(problems)
            print(f"{preset}: {'; '.join(problems) or 'ok'}")
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, **live)
            print(f"{preset}: {path} logits std {live['logits'].std():.3f}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
