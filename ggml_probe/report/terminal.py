"""Rich tables for the terminal."""

from __future__ import annotations

from collections import Counter

from typing import TYPE_CHECKING, Sequence

from rich.markup import escape
from rich.table import Table

from ..analysis.neurons import DRIFT_NAME
from ..analysis.pick import OBJECTIVE_LABELS
from ..fsutil import human_size
from ..models.ggufinfo import GGUFInfo
from ..models.quantize import QuantResult
from .values import shows_accuracy_norm


if TYPE_CHECKING:
    from rich.console import Console


def _types_text(types: dict[str, int]) -> str:
    return ", ".join(f"{t}×{n}" for t, n in types.items())


def print_gguf_info(console: "Console", info: "GGUFInfo", show_tensors: bool = False) -> None:
    table = Table(title=info.path, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("name", info.name),
        ("architecture", info.architecture),
        ("layers", info.n_layers),
        ("hidden size", info.hidden_size),
        ("FFN size", info.ffn_size),
        ("heads / KV heads", f"{info.n_heads} / {info.n_kv_heads}"),
        ("context length", info.context_length),
        ("vocab size", info.vocab_size),
        ("tokenizer", info.tokenizer),
        ("file type", info.file_type),
        ("parameters", f"{info.n_params:,}"),
        ("bits per weight", f"{info.bits_per_weight:.2f}"),
        ("size", human_size(info.size_bytes)),
        ("tensors", f"{info.n_tensors}: {_types_text(info.tensor_types)}"),
    ]
    requant = info.metadata.get("ggml_probe.requantized_from")
    if requant:
        rows.append(("requantized from", requant))
    for key, value in rows:
        table.add_row(key, "—" if value is None else str(value))
    console.print(table)
    if show_tensors:
        tt = Table(title="tensors")
        for col in ("name", "type", "shape", "size"):
            tt.add_column(col, justify="right" if col == "size" else "left")
        for t in info.tensors:
            tt.add_row(t.name, t.type, "×".join(map(str, t.shape)), human_size(t.n_bytes))
        console.print(tt)


def print_ladder(console: "Console", results: Sequence["QuantResult"]) -> None:
    table = Table(title="Quantization ladder")
    for col in ("quant", "file", "size", "bits/weight", "tensor types (as written)", "time"):
        table.add_column(col, justify="right" if col in ("size", "bits/weight", "time") else "left")
    for r in results:
        table.add_row(
            r.quant,
            r.path.name,
            human_size(r.info.size_bytes),
            f"{r.info.bits_per_weight:.2f}",
            _types_text(r.info.tensor_types),
            "kept" if r.skipped else f"{r.seconds:.1f} s",
        )
    console.print(table)
    folders = sorted({str(r.path.parent) for r in results if not r.dry_run})
    if folders:
        console.print(f"[dim]written to {', '.join(folders)}[/]")
    for r in results:
        if r.fallbacks:  # asked → used, per tensor, as llama.cpp's quantizer reported them
            pairs = Counter(f"{a}→{u}" for a, u in r.fallbacks.values())
            console.print(f"[yellow]{r.quant}: llama.cpp fell back for {len(r.fallbacks)} tensors (row size not a "
                          f"multiple of the block): {', '.join(f'{k} ×{n}' for k, n in pairs.most_common())}[/]")
        elif r.fallback_types and not r.skipped:
            console.print(
                f"[yellow]{r.quant}: some tensors use other types ({_types_text(r.fallback_types)}): "
                "llama.cpp falls back where row sizes do not fit the block size or by its mix rules[/]"
            )
        if r.dry_run:
            console.print(f"{r.quant}: dry run, nothing written; {r.path.name} would be {r.info.size_bytes} bytes")
    if results and results[0].requantized_from:
        console.print(
            f"[yellow]Requantized from {results[0].requantized_from}: every level carries that level's error "
            "(recorded in the files' metadata as ggml_probe.requantized_from).[/]"
        )


def _fmt_ci(m: dict | None, pct: bool = False) -> str:
    if not m:
        return "—"
    scale = 100 if pct else 1
    fmt = "{:.1f}" if pct else "{:.3f}"
    text = fmt.format(m["value"] * scale)
    if m.get("ci_low") is not None:
        # The wider side of the (possibly asymmetric) interval keeps the table one line per level.
        half = max(m["value"] - m["ci_low"], m["ci_high"] - m["value"]) * scale
        text += " ±" + fmt.format(half)
    return text


def print_eval_summary(console: "Console", summaries: dict, comparison: dict | None) -> None:
    """Metrics per level (label-set scoring, the paper's beside it), then each level against the reference."""
    first = next(iter(summaries.values()))
    task = first.manifest.get("task", {}) if first.manifest else {}
    table = Table(title=f"{task.get('task', 'task')} · n={first.n_examples} · data: {task.get('source', '?')}")
    norm = any(shows_accuracy_norm(s.metrics) for s in summaries.values())  # choices or answers of several tokens
    cols = ("level", "accuracy %", *(("acc_norm %",) if norm else ()), "confidence", "ACE (paper)", "ECE", "Brier",
            "NLL", "paper acc %", "paper conf")
    for c in cols:
        table.add_column(c, justify="left" if c == "level" else "right", no_wrap=True)
    for level, s in summaries.items():
        ls, pp = s.metrics["label_set"], s.metrics["paper"]
        table.add_row(str(level or s.quant), _fmt_ci(ls["accuracy"], pct=True),
                      *((_fmt_ci(ls.get("accuracy_norm"), pct=True),) if norm else ()), _fmt_ci(ls["mean_confidence"]),
                      _fmt_ci(ls["ace_paper"]), _fmt_ci(ls["ece"]), _fmt_ci(ls["brier"]), _fmt_ci(ls["nll"]),
                      f"{pp['accuracy']['value'] * 100:.1f}", f"{pp['mean_confidence']['value']:.3f}")
    console.print(table)
    console.print("[dim]label-set scoring (softmax over the label words); ± the wider side of the 95% bootstrap "
                  "interval (exact bounds in metrics.json). ACE (paper): 10 equal-count bins, top-label, unweighted. "
                  "ECE: 15 equal-width bins, weighted. paper: full-vocabulary argmax, substring match"
                  + (" (multiple choice: the argmax token starts the gold choice)" if first.metrics.get("multiple_choice")
                     else "")
                  + (". acc_norm: lm-evaluation-harness's, log-likelihood per character of each answer" if norm else "")
                  + ".[/]")
    if comparison:
        ref = comparison["reference"]
        cmp_table = Table(title=f"against the reference level {ref}")
        for c in ("level", "Δ accuracy (pts)", "agreement %", "flips (→wrong/→right)", "KL label", "KL full",
                  "top-1 agree %", "hidden cos", "hidden CKA"):
            cmp_table.add_column(c, justify="left" if c == "level" else "right", no_wrap=True)
        for level, c in comparison["levels"].items():
            f = c["flips"]
            cmp_table.add_row(
                str(level), _fmt_ci(c["accuracy_delta"], pct=True), f"{c['agreement'] * 100:.1f}",
                f"{f['changed']} ({f['correct_to_wrong']}/{f['wrong_to_correct']})", f"{c['kl_label_mean']:.4f}",
                f"{c.get('kl_full_mean', float('nan')):.4f}", f"{c.get('top1_agreement', float('nan')) * 100:.1f}",
                f"{c.get('hidden_cosine_mean', float('nan')):.4f}", f"{c.get('hidden_cka') or float('nan'):.4f}")
        console.print(cmp_table)
        console.print("[dim]KL(P_ref‖P_level) per example, mean; KL full = the whole next-token distribution at the "
                      "answer position; top-1 = same full-vocabulary argmax as the reference.[/]")
    for level, s in summaries.items():
        notes = []
        if s.truncated_examples:
            notes.append(f"{s.truncated_examples} prompts cut to fit --ctx (template kept, longest field shortened)")
        if s.bad_rows:
            notes.append(f"{s.bad_rows} bad rows skipped")
        if s.resumed_examples:
            notes.append(f"{s.resumed_examples} examples reused from an earlier run")
        console.print(f"[dim]{level or s.quant}: {s.run_dir}" + (f" ({'; '.join(notes)})" if notes else "") + "[/]")


def print_study_summary(console: "Console", study: dict, out_dir) -> None:
    """The paper's table side by side per level, for every task, then what changed."""
    s = study["study"]
    console.print(f"[bold]{s['model']}[/] · levels {', '.join(s['quants'])} · reference {s['reference']} · "
                  f"mode {s['mode']} · {s['seconds']:.0f} s")
    for task, t in study["tasks"].items():
        data = t["data"]
        note = f" (stands in for {data['fallback_from']}: its data could not be reached)" if data.get("fallback_from") else ""
        table = Table(title=f"{task} · n={data.get('examples')} · data: {data.get('source')}{note}")
        norm = any(shows_accuracy_norm(run["metrics"]) for run in t["runs"].values())  # choices, or long answers
        cols = ["level", "accuracy %", *(["acc_norm %"] if norm else []), "conf", "ACE", "ECE", "Brier", "paper acc %",
                "agree %", "KL full", "flips"]
        has_neurons = bool(t.get("neurons"))
        if has_neurons:
            cols += ["dead", "salient", "redundant"]
        for c in cols:
            table.add_column(c, justify="left" if c == "level" else "right", no_wrap=True)
        comp = (t.get("comparison") or {}).get("levels", {})
        for level, run in t["runs"].items():
            ls = run["metrics"]["label_set"]
            c = comp.get(level)
            row = [level, _fmt_ci(ls["accuracy"], pct=True), *([_fmt_ci(ls.get("accuracy_norm"), pct=True)] if norm else []),
                   f"{ls['mean_confidence']['value']:.3f}",
                   f"{ls['ace_paper']['value']:.3f}", f"{ls['ece']['value']:.3f}", f"{ls['brier']['value']:.3f}",
                   f"{run['metrics']['paper']['accuracy']['value'] * 100:.1f}",
                   "ref" if c is None else f"{c['agreement'] * 100:.1f}",
                   "" if c is None else f"{c.get('kl_full_mean', float('nan')):.4f}",
                   "" if c is None else str(c["flips"]["changed"])]
            if has_neurons:
                n = t["neurons"].get(level, {})
                row += [_per_layer(n.get("dead")), _per_layer(n.get("salient")), _per_layer(n.get("redundant_pairs"))]
            table.add_row(*row)
        console.print(table)
        if has_neurons:  # what the salient neurons explain, per level
            _print_targets(console, t["neurons"], prefix=f"{task} ")
            _print_experts(console, t["neurons"], prefix=f"{task} ")
    kld = study.get("kld") or {}
    if kld.get("models"):
        table = Table(title=f"text KLD vs {s['reference']} · {kld.get('chunks')}×{kld.get('ctx')} tokens · "
                            f"text: {escape(str(kld.get('text_source')))}")
        for c in ("level", "PPL ratio", "KLD mean", "KLD p99", "KLD max", "RMS Δp %", "same top p %"):
            table.add_column(c, justify="left" if c == "level" else "right", no_wrap=True)
        for level, m in kld["models"].items():
            table.add_row(level, f"{m['ppl_ratio']:.4f}", f"{m['kld_mean']:.5f} ±{m['kld_mean_se']:.5f}",
                          f"{m['kld_p99']:.4f}", f"{m['kld_max']:.4f}", f"{100 * m['rms_dp']:.3f}",
                          f"{100 * m['same_top_p']:.2f}")
        console.print(table)
    elif kld.get("note"):
        console.print(f"[yellow]text KLD not measured: {escape(kld['note'])}[/]")
    _print_floor_and_speed(console, study)
    _print_trace(console, study)
    result = (study.get("pick") or {}).get("result")
    if result:
        if result["pick"] is not None:
            why = result["reasons"][0].removeprefix(f"{result['pick']}: ")
            console.print(f"[bold green]pick: {escape(result['pick'])}[/] — {escape(why)}")
        else:
            console.print(f"[bold red]pick: none[/] — {escape(result['reasons'][0])}")
    for note in s.get("notes") or []:  # what the study shrank to fit, and how to get all of it
        console.print(f"[yellow]note: {escape(note)}[/]")
    if study.get("what_changed"):
        console.print("[bold]What changed[/]")
        for item in study["what_changed"]:
            console.print(f" • {item['text']}")
    console.print(f"[dim]report: {out_dir}/report.html · {out_dir}/report.md · every figure: {out_dir}/study.json[/]")


def floor_line(study: dict, task: str | None) -> str | None:
    """One line of a task's noise floor (text KLD's when task is None): its largest changes of the reference
    under changes that carry no quantization."""
    section = study.get("noise_floor") or {}
    t = section.get("text_kld") if task is None else (section.get("tasks") or {}).get(task)
    floor = (t or {}).get("floor") or {}
    if not floor:
        return None
    shown = [("flips", "flips", "{:.0f}"), ("accuracy_delta", "|Δacc|", "{:.2g}"), ("kl_label_mean", "KL label", "{:.2g}"),
             ("kl_full_mean", "KL full", "{:.2g}"), ("ace_paper_delta", "|ΔACE|", "{:.2g}"),
             ("dead_count_delta", "dead", "{:.0f}"), ("salient_count_delta", "salient", "{:.0f}"),
             ("text_kld_mean", "text KLD", "{:.2g}"), ("text_kld_p99", "p99", "{:.2g}")]
    parts = [f"{label} {spec.format(floor[k]['value'])} ({floor[k]['by']})" for k, label, spec in shown if k in floor]
    return f"noise floor · {task or 'text KLD'} · {section.get('reference')} vs itself: " + ", ".join(parts)


def level_noise_line(study: dict, task: str) -> str | None:
    """One line of a task's other levels, each against itself between batch layouts."""
    levels = (((study.get("noise_floor") or {}).get("tasks") or {}).get(task) or {}).get("levels") or {}
    own = [f"{lvl} {e['effects']['flips']:.0f} flips, KL full {e['effects']['kl_full_mean']:.2g}"
           for lvl, e in levels.items() if {"flips", "kl_full_mean"} <= set(e.get("effects") or {})]
    return f"noise floor · {task} · each level vs itself between batch layouts: " + "; ".join(own) if own else None


def _print_floor_and_speed(console: "Console", study: dict) -> None:
    """The noise floor (a line per task and for the text KLD) and the speed table of a study."""
    for task in [*((study.get("noise_floor") or {}).get("tasks") or {}), None]:
        for line in (floor_line(study, task), level_noise_line(study, task) if task else None):
            if line:
                console.print(escape(line))
    speed = study.get("speed") or {}
    if speed.get("levels"):
        st = speed.get("settings") or {}
        table = Table(title=f"speed · pp{st.get('n_prompt')} / tg{st.get('n_gen')} · {st.get('reps')} reps · "
                            f"{st.get('threads')} threads")
        for c in ("level", "pp tokens/s", "tg tokens/s", "peak RSS"):
            table.add_column(c, justify="left" if c == "level" else "right", no_wrap=True)
        for level, d in speed["levels"].items():
            rss = (d.get("memory") or {}).get("peak_rss_bytes")
            table.add_row(level, _rate(d.get("pp_tokens_per_s"), d.get("pp_tokens_per_s_sd")),
                          _rate(d.get("tg_tokens_per_s"), d.get("tg_tokens_per_s_sd")),
                          human_size(rss) if rss else "—")
        console.print(table)


def trace_line(level: str, t: dict, reference: str | None = None) -> str:
    """One level's divergence trace in a line: its KL, where the error enters most, how the residual grows."""
    kl, summary = t.get("kl") or {}, t.get("summary") or {}
    parts = [f"KL {kl['full']:.4f}" if kl.get("full") is not None else "KL not measured"]
    top = summary.get("largest_kl_step")
    if top:
        share = f", {100 * top['share']:.0f}%" if top.get("share") is not None else ""
        parts.append(f"enters most at {top['part']} ({top['step']:+.4f}{share})")
    a, b = summary.get("l_out_rel_err_first"), summary.get("l_out_rel_err_last")
    if a and b and a["layer"] != b["layer"]:
        parts.append(f"residual error {a['rel_err']:.3f} after block {a['layer']} → {b['rel_err']:.3f} after "
                     f"block {b['layer']}")
    return (f"where the error enters · {level} vs {reference or t.get('reference')} ({kl.get('tokens')} tokens): "
            + "; ".join(parts))


def _print_trace(console: "Console", study: dict) -> None:
    trace = study.get("trace") or {}
    for level, t in (trace.get("levels") or {}).items():
        console.print(escape(trace_line(level, t, study["study"].get("reference"))))
    if trace.get("note"):
        console.print(f"[yellow]where the error enters: {escape(trace['note'])}[/]")


def _rate(mean, sd) -> str:
    return "—" if mean is None else f"{mean:.1f} ±{sd or 0:.1f}"


def targets_text(targets: dict) -> str:
    """A level's salient_targets in one line: which tokens were attributed and how many are no label."""
    pieces = ", ".join(f"{piece!r}×{count}" for piece, count in targets["tokens"].items())
    return f"attributed tokens ({targets['kind']}): {pieces}; not a label: {targets['not_label']} of {targets['n']}"


def _print_targets(console: "Console", levels: dict, prefix: str = "") -> None:
    for level, n in levels.items():
        t = n.get("salient_targets")
        if t:
            style = "yellow" if t["not_label"] else "dim"
            console.print(f"[{style}]{prefix}{escape(level)} · {escape(targets_text(t))}[/]")


def _per_layer(values: dict | None) -> str:
    if not values:
        return "—"
    return "/".join(str(v) for v in values.values())


def _print_experts(console: "Console", levels: dict, prefix: str = "") -> None:
    """Mixture-of-experts levels: how often each expert was routed per layer, and why no salient neurons."""
    for level, n in levels.items():
        moe = n.get("experts")
        if not moe:
            continue
        for key, r in moe["layers"].items():
            console.print(f"[dim]{prefix}{escape(level)} layer {key} · tokens routed to each of {moe['n_expert']} experts "
                          f"(top {moe['n_expert_used']} of {r['tokens']} tokens): {', '.join(map(str, r['routed']))}; "
                          f"dead per expert ({n['neuron']}): {', '.join(map(str, r['dead_per_expert'][n['neuron']]))}[/]")
        console.print(f"[dim]{prefix}{escape(level)}: {escape(n['salient_note'])}[/]")


def print_neuron_summary(console: "Console", levels: dict, comparison: dict | None) -> None:
    """The paper's neuron table per level: dead, salient, redundant per layer, and overlap with the reference."""
    first = next(iter(levels.values()))
    table = Table(title=f"{first['neuron']} neurons · τ = {first['tau']} · {first.get('tokens', 0)} tokens per level")
    cols = ["level", "layer", "dead", "max|a| median", "salient", "redundant pairs", "groups"]
    if comparison:
        cols += ["dead Jaccard", "salient Jaccard", DRIFT_NAME]
    for c in cols:
        table.add_column(c, justify="left" if c == "level" else "right", no_wrap=True)
    for level, n in levels.items():
        cmp_ = (comparison or {}).get(level, {})
        for layer in n["layers"]:
            key = str(layer)
            sal = (n.get("salient") or {}).get(key)
            conv = (n.get("salient_converged") or {}).get(key)
            row = [level, key, str(n["dead"][key]), f"{n['max_abs_quantiles'][key][2]:.3f}",
                   "—" if sal is None else f"{sal}" + ("" if conv in (None, True) else " (unconverged)"),
                   str(n["redundant_pairs"].get(key, "—")), str(n.get("redundancy_groups", {}).get(key, "—"))]
            if comparison:
                if not cmp_:
                    row += ["ref", "ref", "ref"]
                else:
                    sj = cmp_.get("salient_jaccard", {}).get(key)
                    drift = cmp_["drift"].get(key, {}).get("mean")
                    row += [f"{cmp_['dead_jaccard'].get(key, float('nan')):.2f}", "—" if sj is None else f"{sj:.2f}",
                            "—" if drift is None else f"{drift:.4f}"]
            table.add_row(*row)
    console.print(table)
    for note in dict.fromkeys(n["redundancy_note"] for n in levels.values() if n.get("redundancy_note")):
        console.print(f"[yellow]{escape(note)}[/]")
    method = first.get("salient_method")
    if method:
        console.print(f"[dim]salient: {method}[/]")
    _print_targets(console, levels)
    _print_experts(console, levels)
    for level, n in levels.items():  # an unconverged integral's salient set is not a finding: say so
        detail = (n.get("salient_detail") or {}).get("layers") or {}
        for key, d in detail.items():
            ab = d.get("ablation")
            if ab:
                console.print(f"[dim]{level} layer {key}: switching off the top {len(ab['neurons'])} salient candidates "
                              f"moves log p(target) by {ab['delta_logprob_mean']:+.3f} on average "
                              f"(|Δ| {ab['delta_logprob_abs_mean']:.3f}; {len(ab['control_neurons'])} random neurons: "
                              f"{ab['control_delta_logprob_mean']:+.3f}, |Δ| {ab['control_delta_logprob_abs_mean']:.3f})[/]")
            if d.get("converged") is False:
                console.print(f"[yellow]{level} layer {key}: the 50-step integral did not converge "
                              f"({d['converged_prompts']}/{n['salient_detail']['n_prompts']} prompts within tolerance; "
                              f"mean |Σ attr − Δ log p| {d['completeness_error_mean']:.3g} nats against a mean "
                              f"|Δ log p| of {d['real_change_mean']:.3g}): its attributions, and so its salient set, are not "
                              f"findings; the ablation line is the causal test of its candidates[/]")


def print_kld_summary(console: "Console", result: dict) -> None:
    """`ggml-probe kld`: llama-perplexity's figures per model, as its final statistics print them."""
    head = (f"reference {escape(result['reference'])} · {result['chunks']} chunks of {result['ctx']} tokens · "
            f"base {result['base_source']}: {escape(result['base_file'])}")
    table = Table(title=head, title_justify="left")
    for col in ("model", "tokens", "PPL", "ln(PPL/PPL base)", "KLD mean", "KLD median", "KLD p99", "KLD p99.9",
                "KLD max", "RMS Δp %", "same top p %"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, m in result["models"].items():
        table.add_row(
            escape(name), str(m["n_tokens"]), f"{m['ppl']:.4f} ±{m['ppl_se']:.4f}",
            f"{m['ln_ppl_ratio']:+.5f} ±{m['ln_ppl_ratio_se']:.5f}", f"{m['kld_mean']:.6f} ±{m['kld_mean_se']:.6f}",
            f"{m['kld_median']:.6f}", f"{m['kld_p99']:.5f}", f"{m['kld_p999']:.5f}", f"{m['kld_max']:.5f}",
            f"{100 * m['rms_dp']:.3f} ±{100 * m['rms_dp_se']:.3f}",
            f"{100 * m['same_top_p']:.3f} ±{100 * m['same_top_p_se']:.3f}")
    console.print(table)
    if result["models"]:
        first = next(iter(result["models"].values()))
        console.print(f"PPL(base) {first['ppl_base']:.4f} ±{first['ppl_base_se']:.4f} · "
                      "definitions: llama-perplexity --kl-divergence (tools/perplexity/perplexity.cpp)")


def print_pick_summary(console: "Console", result: dict) -> None:
    """`ggml-probe pick`: every level's size, bits per weight, memory need and text KLD against the
    reference, whether it is on the Pareto frontier and within the budget; then the pick and why."""
    p = result["pick"]
    text = result["text"]
    where = (f"{text['task']} {'/'.join(text['fields'])} from {text['data']}" if text["source"] == "task"
             else text.get("path") or "the given text")
    for note in result.get("notes", []):
        console.print(f"[yellow]{escape(result['model'])}: {escape(note)}.[/]")
    levels = result["levels"]
    has_acc = any(d.get("accuracy_delta") is not None for d in levels.values())
    has_pp = any(d.get("pp_tokens_per_s") is not None for d in levels.values())
    has_tg = any(d.get("tg_tokens_per_s") is not None for d in levels.values())
    title = (f"{escape(result['model'])} · KLD vs {result['reference']} on {escape(str(where))} · "
             f"{text['chunks']} chunks of {text['ctx']} tokens · memory need at a {result['run_ctx']}-token context")
    table = Table(title=title, title_justify="left")
    cols = ["level", "size", "bits/weight", "memory need", "KLD mean", "KLD p99", "same top p %"]
    cols += ["accuracy Δ"] * has_acc + ["pp t/s"] * has_pp + ["tg t/s"] * has_tg + ["frontier", "budget"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("level", "frontier", "budget") else "right")
    for name, d in levels.items():
        v = p["levels"][name]
        ref = d.get("reference")
        row = [f"[bold]{escape(name)}[/]" if name == p["pick"] else escape(name), human_size(d["size_bytes"]),
               f"{d['bits_per_weight']:.2f}", human_size(v["memory_need_bytes"]),
               "ref" if ref else f"{d['kld_mean']:.5f} ±{d['kld_mean_se']:.5f}",
               "ref" if ref else f"{d['kld_p99']:.4f}", "ref" if ref else f"{100 * d['same_top_p']:.2f}"]
        if has_acc:
            a, ci = d.get("accuracy_delta"), d.get("accuracy_delta_ci")
            row.append("—" if a is None else "ref" if ref else f"{a:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""))
        for key, shown in (("pp_tokens_per_s", has_pp), ("tg_tokens_per_s", has_tg)):
            if shown:
                row.append("—" if d.get(key) is None else f"{d[key]:.1f}")
        row.append("✓" if v["on_frontier"] else "dominated by " + ", ".join(v["dominated_by"]))
        row.append("[green]✓[/]" if v["meets_budget"] else
                   "[red]" + escape("; ".join(f["text"] for f in v["failures"])) + "[/]")
        table.add_row(*row)
    console.print(table)
    objectives = " × ".join(OBJECTIVE_LABELS.get(o, o) for o in p["objectives"])
    dropped = "; ".join(f"{OBJECTIVE_LABELS.get(k, k)} {why}" for k, why in p["dropped_objectives"].items())
    console.print(f"[dim]frontier over {objectives}" + (f" (left out: {escape(dropped)})" if dropped else "")
                  + f" · memory budget {human_size(p['budget']['memory_bytes'])}: "
                  + escape(p["budget"]["memory_source"]) + "[/]")
    if p["pick"] is not None:
        why = p["reasons"][0].removeprefix(f"{p['pick']}: ")
        console.print(f"[bold green]pick: {escape(p['pick'])}[/] — {escape(why)}")
        for note in p["levels"][p["pick"]]["notes"]:
            console.print(f"  [yellow]{escape(note)}[/]")
    else:
        console.print(f"[bold red]pick: none[/] — {escape(p['reasons'][0])}")


def print_bench_summary(console: "Console", result: dict) -> None:
    """`ggml-probe bench`: tokens/s per level and test (mean ± sd, llama-bench's figures) and memory."""
    s = result["settings"]
    first = next(iter(result["levels"].values()), None)
    engine = first["engine"] if first else {}
    head = (f"{s['reps']} repetitions · {s['threads']} threads · batch {s['batch']}/{s['ubatch']} · "
            f"flash attention {'on' if s['flash_attn'] else 'off'} · gpu layers {engine.get('gpu_layers', '?')}"
            + (f" ({engine['offloaded']} offloaded)" if engine.get("offloaded") else ""))
    tests = list(first["tests"]) if first else []
    table = Table(title=head, title_justify="left")
    has_vram = any(lv["memory"].get("vram_used_bytes") for lv in result["levels"].values())
    cols = ["level", "file", "bits/weight", *(f"{t} tok/s" for t in tests), "llama.cpp memory", "peak RSS"]
    for col in cols + (["VRAM"] if has_vram else []):
        table.add_column(col, justify="left" if col == "level" else "right", no_wrap=True)
    for name, lv in result["levels"].items():
        m = lv["memory"]
        row = [escape(name), human_size(lv["file_bytes"]), f"{lv['bits_per_weight']:.2f}"]
        for t in tests:
            d = lv["tests"].get(t)
            row.append("—" if d is None else f"{d['tokens_per_second']:.2f} ±{d['tokens_per_second_sd']:.2f}")
        row.append(f"{human_size(m['llama_bytes'])} ({human_size(lv['model_bytes'])} + KV {human_size(m['kv_bytes'])}"
                   f" + compute {human_size(m['compute_bytes'])})")
        row.append(human_size(m["peak_rss_bytes"]) + ("" if m["peak_rss_scope"] == "level" else " (process)"))
        if has_vram:
            row.append(", ".join(f"{k} {human_size(v)}" for k, v in (m.get("vram_used_bytes") or {}).items()) or "—")
        table.add_row(*row)
    console.print(table)
    console.print("[dim]definitions: llama-bench (tools/llama-bench/llama-bench.cpp): random tokens, a warm-up run, "
                  "mean ± sample sd of each repetition's tokens/s; ppN one prompt from an empty cache, tgN one "
                  "token at a time with the cache kept. llama.cpp memory: weights + KV cache + output and compute "
                  "buffers as llama.cpp allocates them; peak RSS: this process while the level ran[/]")
