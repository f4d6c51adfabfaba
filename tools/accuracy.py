"""Accuracy report: cpuinfer's logits against the reference logits shipped with test fixtures.

    python -m tools.accuracy [DIR ...]      (default: tests/data/tiny/* and tests/data/smollm2)

A fixture folder holds ``ids.json`` and, per GGUF file ``NAME-QTYPE.gguf``, llama.cpp's logits
``llamacpp_logits_QTYPE.npy`` (and ``hf_logits_f32model.npy`` for the F32 file, from Hugging Face).
The SmolLM2 folder holds ``reference.json`` (prompt, llama.cpp's ids and greedy text) and
``llamacpp_prompt_logits_f16.npy``; its model is the bundled one. Prints one markdown row per file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def kl_top1(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Mean KL(ref ‖ got) over positions, and top-1 agreement."""
    def logp(z):
        z = z.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp, lq = logp(ref), logp(got)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean()), float((ref.argmax(-1) == got.argmax(-1)).mean())


def tiny_rows(folder: Path):
    import cpuinfer

    ids = json.loads((folder / "ids.json").read_text())["ids"]
    for path in sorted(folder.glob("*.gguf")):
        qtype = path.stem.rsplit("-", 1)[-1]
        m = cpuinfer.load(path)
        got = m.logits(ids)
        if qtype.lower() == "f32" and (folder / "hf_logits_f32model.npy").exists():
            ref = np.load(folder / "hf_logits_f32model.npy")[:, :m.n_vocab]
            yield path.name, m.arch, "Hugging Face (PyTorch f32)", float(np.abs(got - ref).max()), *kl_top1(ref, got)
        ref_path = folder / f"llamacpp_logits_{qtype}.npy"
        if ref_path.exists():
            ref = np.load(ref_path)[:, :m.n_vocab]
            yield path.name, m.arch, "llama.cpp, same file", float(np.abs(got - ref).max()), *kl_top1(ref, got)


def smollm2_rows(folder: Path):
    import cpuinfer
    from cpuinfer.bundled import bundled_model_path

    ref = json.loads((folder / "reference.json").read_text())
    m = cpuinfer.load(bundled_model_path())
    ids = m.tokenize(ref["prompt"], special=True)
    got = m.logits(ids)
    lref = np.load(folder / "llamacpp_prompt_logits_f16.npy").astype(np.float32)
    greedy = m.detokenize(m.generate_ids(ids, max_tokens=len(ref["greedy_ids"]), temperature=0))
    note = f"llama.cpp; ids {'equal' if ids == ref['prompt_ids'] else 'DIFFER'}; greedy text " \
           f"{'equal' if greedy == ref['greedy_text'] else 'DIFFERS'}"
    yield bundled_model_path().name, m.arch, note, float(np.abs(got - lref).max()), *kl_top1(lref, got)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    data = Path(__file__).resolve().parent.parent / "tests" / "data"
    folders = [Path(a) for a in argv] or sorted((data / "tiny").iterdir()) + [data / "smollm2"]
    print("| file | arch | reference | max abs Δlogit | mean KL | top-1 |")
    print("|---|---|---|---|---|---|")
    for f in folders:
        rows = smollm2_rows(f) if (f / "reference.json").exists() else tiny_rows(f)
        for name, arch, ref, dmax, kl, top1 in rows:
            print(f"| {name} | {arch} | {ref} | {dmax:.2g} | {kl:.2g} | {100 * top1:.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
