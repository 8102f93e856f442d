#!/usr/bin/env python
"""A study's noise floor beside each level's effects, as a Markdown table (for benchmarks/noise_floor.md).

Reads STUDY/study.json: per task, every floor metric under each perturbation, the floor (their maximum) and the
same metric of every quantization level against the reference (analysis.noise_floor.effects, the one
definition both use), then the text-KLD floor, the seconds the floor and the speed table took, and the speed.

    python scripts/noise_floor_table.py studies/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ggml_probe.analysis.noise_floor import effects


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study_dir", type=Path)
    args = ap.parse_args()
    s = json.loads((args.study_dir / "study.json").read_text(encoding="utf-8"))
    floor, ref = s.get("noise_floor") or {}, s["study"]["reference"]
    for task, t in (floor.get("tasks") or {}).items():
        names = list(t["effects"])
        comp = (s["tasks"][task].get("comparison") or {}).get("levels") or {}
        neurons = s["tasks"][task].get("neurons") or {}
        levels = {lvl: effects(c, neurons.get(ref), neurons.get(lvl)) for lvl, c in comp.items()}
        print(f"\n### {task} (n={s['tasks'][task]['data'].get('examples')}): {ref} against itself, and each level\n")
        print("| metric | " + " | ".join(names) + " | floor | " + " | ".join(levels) + " |")
        print("|---" * (len(names) + len(levels) + 2) + "|")
        for metric, f in t["floor"].items():
            cells = [f"{t['effects'][n].get(metric, float('nan')):.3g}" for n in names]
            lv = [f"{v.get(metric, float('nan')):.3g}" for v in levels.values()]
            print(f"| {metric} | " + " | ".join(cells) + f" | **{f['value']:.3g}** | " + " | ".join(lv) + " |")
    text = floor.get("text_kld")
    if text:
        names = list(text["effects"])
        models = (s.get("kld") or {}).get("models") or {}
        print("\n### text KLD\n")
        print("| metric | " + " | ".join(names) + " | floor | " + " | ".join(models) + " |")
        print("|---" * (len(names) + len(models) + 2) + "|")
        keys = {"text_kld_mean": "kld_mean", "text_kld_p99": "kld_p99"}
        for metric, f in text["floor"].items():
            lv = [f"{m[keys[metric]]:.3g}" if metric in keys else f"{1 - m['same_top_p']:.3g}" for m in models.values()]
            print(f"| {metric} | " + " | ".join(f"{text['effects'][n][metric]:.3g}" for n in names)
                  + f" | **{f['value']:.3g}** | " + " | ".join(lv) + " |")
    speed = s.get("speed") or {}
    print(f"\nstudy {s['study']['seconds']:.0f} s; noise floor {floor.get('seconds', float('nan')):.0f} s; "
          f"speed {speed.get('seconds', float('nan')):.0f} s ({speed.get('settings')})")
    for lvl, d in (speed.get("levels") or {}).items():
        print(f"- {lvl}: pp {d['pp_tokens_per_s']:.1f} ± {d['pp_tokens_per_s_sd']:.1f}, tg {d['tg_tokens_per_s']:.1f} ± "
              f"{d['tg_tokens_per_s_sd']:.1f} tokens/s, peak RSS {d['memory']['peak_rss_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
