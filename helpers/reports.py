"""What a notebook says about its own run: the recipe it trained, as a table, and a closing conclusion written from
the numbers in its summary (see :mod:`helpers.summaries`).

Nothing in a conclusion is written in advance about the outcome: each sentence is chosen by, and filled with, the
run's measurements, so a run that goes differently reads differently. Statements that rest on something other
than the run name their source.
"""
from __future__ import annotations

from dataclasses import asdict

import pandas as pd
from IPython.display import Markdown

from helpers.recipes import Recipe, named_recipe


def recipe_table(recipe: Recipe, **others: Recipe) -> pd.DataFrame:
    """Every setting of this run's ``recipe`` (and of ``others``, a column each under its keyword) beside the blog
    recipe's own value, one row per setting; ``differs`` marks a row where a run departs from what blog users copy."""
    recipes = {"this run": recipe, **others}
    blog = asdict(named_recipe("blog"))
    table = pd.DataFrame({name: pd.Series(asdict(r), dtype=object) for name, r in recipes.items()})
    table["blog recipe"] = pd.Series(blog, dtype=object)
    table["differs"] = ["yes" if any(asdict(r)[key] != blog[key] for r in recipes.values()) else ""
                        for key in table.index]
    table.index.name = "setting"
    return table


def _seconds(value: float) -> str:
    return f"{value / 60:.1f} min" if value >= 120 else f"{value:.0f} s"


def _trend(first: float, last: float) -> str:
    return "fell" if last < first else "did not fall"


def inference_conclusion(summary: dict) -> Markdown:
    """Notebook 01: how many answers ended on their own, and how fast they came."""
    answers, cap = summary["answers"], summary["max_new_tokens"]
    ended = sum(answer["ended_with_eos"] for answer in answers)
    at_cap = sum(answer["new_tokens"] >= cap for answer in answers)
    lines = [f"**{ended} of {len(answers)} answers ended with EOS**; {at_cap} ran to the {cap}-token cap."]
    if summary["share_ended_with_eos"] < 0.5:
        lines.append("Most answers did not end on their own. Ending an answer is what notebook 03's labels train "
                     "(one labelled EOS per example), and notebook 05 measures whether it worked.")
    else:
        lines.append("Most answers ended on their own already; notebook 05 measures whether training changes that.")
    lines.append(f"On {summary['device']} ({summary['precision']}, quantization {summary['quantization']}) the "
                 f"model loaded in {_seconds(summary['load_seconds'])}; the first token of an answer came after "
                 f"{summary['median_time_to_first_token_s']:.2f} s and then {summary['median_tokens_per_s']:.1f} "
                 f"tokens/s (medians over the {summary['questions']} answers).")
    return Markdown("\n\n".join(lines))


def smoke_conclusion(summary: dict) -> Markdown:
    """Notebook 02: did the blog recipe train, and does its adapter stop talking."""
    trainable, total = summary["trainable_parameters"], summary["total_parameters"]
    lines = [f"**The blog recipe trained {summary['global_step']} optimizer steps** in "
             f"{_seconds(summary['wall_seconds'])} ({summary['seconds_per_step']} s a step) on {summary['device']} "
             f"in {summary['precision']}, updating {trainable:,} of {total:,} parameters ({trainable / total:.2%}) "
             f"in {', '.join(summary['lora_targets'])}."]
    logged = summary["logged_losses"]
    if len(logged) > 1:
        lines.append(f"The logged loss {_trend(logged[0][1], logged[-1][1])}: {logged[0][1]:.3f} at step "
                     f"{logged[0][0]}, {logged[-1][1]:.3f} at step {logged[-1][0]}.")
    lines.append(f"Collapse monitor: {summary['collapse_text']}."
                 + (" Notebook 04 takes this failure apart." if summary["collapse"]["collapsed"] else ""))
    answer, cap = summary["answer"], summary["answer_max_new_tokens"]
    if answer["ended_with_eos"]:
        lines.append(f"The adapter's answer ended with EOS after {answer['new_tokens']} tokens.")
    else:
        lines.append(f"The adapter's answer did not end: it ran {answer['new_tokens']} tokens, to the {cap}-token "
                     f"cap." + (" With the blog's labels no EOS is ever a trained label (the label table of notebook "
                                "03 counts them), so nothing taught the model to stop."
                                if summary["labels"] == "blog" else ""))
    return Markdown("\n\n".join(lines))


def training_conclusion(summary: dict) -> Markdown:
    """Notebook 03: how the run went, loss by loss, and where its adapter is."""
    lines = [f"**The {summary['recipe_name']} recipe** ({summary['labels']} labels, {summary['precision']}) "
             f"ran {summary['global_step']} optimizer steps over {summary['train_rows']} training rows in "
             f"{_seconds(summary['wall_seconds'])} ({summary['seconds_per_step']} s a step) on {summary['device']}."]
    if summary["resumed_from"]:
        lines.append(f"It resumed from {summary['resumed_from']}; the wall time counts only this session.")
    logged = summary["logged_losses"]
    if len(logged) > 1:
        lines.append(f"The logged training loss {_trend(logged[0][1], logged[-1][1])}: {logged[0][1]:.3f} at "
                     f"step {logged[0][0]}, {logged[-1][1]:.3f} at step {logged[-1][0]}.")
    evals = summary["eval_losses"]
    if len(evals) > 1:
        lines.append(f"The eval loss on {summary['eval_rows']} held-out rows {_trend(evals[0][1], evals[-1][1])}: "
                     f"{evals[0][1]:.3f} at step {evals[0][0]}, {evals[-1][1]:.3f} at step {evals[-1][0]}"
                     + (": answers it never trained on became more likely too." if evals[-1][1] < evals[0][1]
                        else ": a sign of overfitting, or of a learning rate too high for this data."))
    elif evals:
        lines.append(f"One eval loss: {evals[0][1]:.3f} at step {evals[0][0]}.")
    else:
        lines.append("No eval loss was computed (eval_steps 0): notebook 05 scores this adapter.")
    if summary["stopped_at"] is not None:
        lines.append(f"The collapse monitor stopped the run at step {summary['stopped_at']} "
                     f"({summary['collapse_text']}) and saved the adapter of the last step with a finite loss.")
    else:
        lines.append(f"Collapse monitor: {summary['collapse_text']}.")
    lines.append(f"The adapter is in `{summary['adapter_dir']}` beside `run_card.json`; notebook 05 compares it "
                 f"with the base model.")
    return Markdown("\n\n".join(lines))


def collapse_conclusion(summary: dict) -> Markdown:
    """Notebook 04: the diagnosis, one finding per line, and the pictures that show it."""
    findings = "\n".join(f"- {line}" for line in summary["diagnosis"].splitlines() if line.strip())
    blog = summary["runs"]["blog"]
    pictures = "`timeline.png` (logged against raw loss, learning rate, loss scale, skipped steps)"
    if summary["first_nonfinite_module"]:
        pictures += " and `headroom.png` (each module's room below fp16's maximum at the replayed step)"
    return Markdown(f"**What this run of {blog['global_step']} steps at lr {summary['learning_rate']:g} "
                    f"({blog['precision']}, LoRA on {summary['lora_targets']}) showed:**\n\n{findings}\n\n"
                    f"The output folder holds {pictures}.")


def evaluation_conclusion(summary: dict) -> Markdown:
    """Notebook 05: each adapter against the base model, metric by metric, and the merge check."""
    by_model = {row["model"]: row for row in summary["metrics"]}
    base = by_model["base"]
    lines = [f"On {summary['generated']} eval questions (greedy, repetition penalty {summary['repetition_penalty']}, "
             f"at most {summary['max_new_tokens']} new tokens), the base model ended "
             f"{base['share_ended_with_eos']:.0%} of its answers with EOS; its answer perplexity was "
             f"{base['answer_perplexity']:.2f}."]
    for label, row in by_model.items():
        if label == "base":
            continue
        lines.append(f"- **{label}**: {row['share_ended_with_eos']:.0%} ended with EOS "
                     f"({100 * (row['share_ended_with_eos'] - base['share_ended_with_eos']):+.0f} points), answer "
                     f"perplexity {row['answer_perplexity']:.2f} ({row['perplexity_change_vs_base']:+.0%}), "
                     f"morpheme F1 {row['morpheme_f1']:.3f} (base {base['morpheme_f1']:.3f}), repeated 3-grams "
                     f"{row['repeated_3gram_share']:.2f} (base {base['repeated_3gram_share']:.2f}), "
                     f"{row['mean_answer_tokens']:.0f} tokens an answer.")
    best = min(by_model.values(), key=lambda row: row["answer_perplexity"])
    lines.append(f"The lowest answer perplexity, the reference answers and their end predicted best, is "
                 f"**{best['model']}**'s.")
    speeds = [f"{label} {row['mean_tokens_per_s']:.1f} / {row['batched_tokens_per_s']:.1f}"
              for label, row in by_model.items() if row.get("mean_tokens_per_s") and row.get("batched_tokens_per_s")]
    if speeds:
        lines.append(f"Tokens/s on {summary['device']}, one question at a time / {summary['generation_batch_size']} "
                     f"in a batch: {'; '.join(speeds)}.")
    took = [f"{label} {_seconds(row['wall_seconds'])}" for label, row in by_model.items() if row.get("wall_seconds")]
    if took:
        lines.append(f"Loading and measuring took {', '.join(took)}"
                     + (f"; the merge check and export {_seconds(summary['merge']['seconds'])}."
                        if summary["merge"] and "seconds" in summary["merge"] else "."))
    merge = summary["merge"]
    if merge:
        verdict = "within" if merge["within_tolerance"] else "**outside**"
        lines.append(f"Merging **{merge['adapter']}** into bf16 moved the logits by "
                     f"{merge['mean_abs_error_merged_bf16']:.4f} on average against the adapter in fp32, where the unmerged bf16 model moves them by "
                     f"{merge['mean_abs_error_unmerged_bf16']:.4f}: {verdict} the {merge['tolerance_factor']:g}x "
                     f"tolerance, top-1 agreement {merge['top1_agreement_merged_vs_fp32']:.1%}. The merged model is "
                     f"in `{merge['saved_to']}`.")
    else:
        lines.append("No adapter was merged (merge_adapter is None).")
    return Markdown("\n\n".join(lines))
