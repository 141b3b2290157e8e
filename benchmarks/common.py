"""Shared helpers: the machine description, appending a dated section to RESULTS.md, and HF's reference
training step (torch is imported by the caller: this module stays light for the processes that import it)."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "RESULTS.md"


def machine() -> str:
    """CPU model, its widest vector ISA and core count: the results depend on them (PyTorch's MKL runs its AVX-512
    kernels on Intel only; MindSpore's oneDNN on either)."""
    cpu, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown CPU":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = next((name for flag, name in (("amx_tile", "AVX-512 + AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
                if flag in flags), "no AVX2")
    return (f"{cpu} ({isa}), {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def speedups(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        x = r.get("extra", {})
        if "decode_speedup_vs_hf" in x:
            screened = ", greedy head screened" if x.get("greedy_head") == "screened" else ""
            ran_on = {"native": f", kernels: native ({x.get('kernel_threads')} threads{screened})",
                      "mindspore": f", kernels: mindspore (head {x.get('head_layout')})"}.get(x.get("kernels"), "")
            lines.append(f"- {r['backend']} b{r['batch_size']} len{r['total_length']}: decode "
                         f"{x['decode_speedup_vs_hf']}x HF, prefill {x['prefill_speedup_vs_hf']}x HF, tokens equal "
                         f"to HF: {x['tokens_equal_hf']}{ran_on}")
        elif "step_speedup_vs_hf" in x:
            paired = f" (step by step: {x['paired_speedup_vs_hf']}x)" if "paired_speedup_vs_hf" in x else ""
            lines.append(f"- {r['backend']}: training {x['step_speedup_vs_hf']}x HF + torch AdamW{paired}")
    return "\n".join(lines)


def append_results(title: str, command: str, where: str, table: str, rows: list[dict]) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"\n## {title} ({stamp})\n\n- command: `{command}`\n- machine: {where}\n\n{table}\n"
            f"{speedups(rows)}\n")
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(text)
    print(text)


def hf_train_step(model: Any, opt: Any, torch: Any, ids: Any) -> None:
    """One step of the HF reference: causal-LM loss on `ids` as labels, backward, clip at 1.0, AdamW, zero_grad."""
    model(input_ids=ids, labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
