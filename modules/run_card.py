"""A run folder's README.md, the model card a Hugging Face user expects beside an adapter: the base
model, the data (rubrics and ranges, split sizes), the training settings (losses, LoRA, precision),
the test QWK table and the confidence summary, and the one command that scores new essays with it.
It replaces the empty card PEFT's ``save_pretrained`` writes. A ``--score_path`` run gets one too,
naming the adapter that scored. Built from the run manifest and ``evaluation_results.json`` alone."""
from __future__ import annotations

from pathlib import Path

from modules.data import DatasetInfo
from modules.jsonio import write_text_atomic

CARD = "README.md"


def _path_as_typed(path: Path | str) -> str:
    """``path`` relative to the working directory when it lies inside it, else as it is."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _scoring_command(base_model: str, adapter_dir: Path | str) -> str:
    return (f"python main_pipeline.py --base_model_name {base_model} --adapter_dir {_path_as_typed(adapter_dir)} "
            f"--score_path new_essays.jsonl")


def _data_lines(info: DatasetInfo, split_sizes: dict | None) -> list[str]:
    lines = [f"Dataset `{info.name or 'unnamed'}` (language `{info.language}`), one integer score per rubric:", "",
             "| rubric | range |", "|---|---|"]
    lines += [f"| {r.name} | {r.min}-{r.max} |" for r in info.rubrics]
    if split_sizes:
        lines += ["", "Essays: " + ", ".join(f"{split} {n}" for split, n in split_sizes.items()) + "."]
    return lines


def _training_lines(manifest: dict) -> list[str]:
    c = manifest.get("config") or {}
    loss = "CE"
    if c.get("ntl_weights"):
        loss += f" + {c['ntl_weights']:g} NTL-{str(c.get('loss_type', 'mse')).upper()} (score tokens)"
    if c.get("mtl") and c.get("emo_weights"):
        loss += f" + {c['emo_weights']:g} EMO (feedback tokens)"
    layers = f"the top {c['lora_top_layers']} layers" if c.get("lora_top_layers") else "every layer"
    precision = manifest.get("precision") or {}
    train = manifest.get("train") or {}
    steps = c.get("max_steps") or -1
    length = f"{steps} steps" if steps > 0 else f"{c.get('num_train_epochs'):g} epochs"
    targets = "the score line and the feedback" if c.get("mtl") else "the score line"
    lines = [f"- Targets: {targets} ({c.get('prompt_format')} prompts, essays cut to "
             f"{manifest.get('max_prompt_tokens')} prompt tokens).",
             f"- Loss: {loss}.",
             f"- LoRA r {c.get('lora_r')}, alpha {c.get('lora_alpha')}, dropout {c.get('lora_dropout')} on "
             f"{c.get('lora_target_modules')} of {layers}.",
             f"- Learning rate {c.get('learning_rate'):g}, batch {c.get('per_device_train_batch_size')} x "
             f"{c.get('gradient_accumulation_steps')} accumulation, {length}, seed {c.get('seed')}.",
             f"- Precision: {'bf16 autocast' if precision.get('chosen') == 'bf16' else 'float32'} "
             f"(`--precision {precision.get('requested', '?')}`: {precision.get('reason', 'not recorded')}).",
             f"- Device {manifest.get('device')}, {manifest.get('world_size', 1)} process"
             f"{'es' if manifest.get('world_size', 1) > 1 else ''}."]
    if train:
        kept = Path(str(train.get("kept_checkpoint") or train.get("best_checkpoint"))).name
        best = train.get("best_eval_loss")
        lines.append(f"- Trained {train.get('global_step')} steps in {train.get('seconds')} s; kept `{kept}`"
                     + (f" (best eval loss {best:.4f})." if best is not None else "."))
    return lines


def _results_lines(results: dict, info: DatasetInfo, n_essays: int) -> list[str]:
    blocks = [b for b in ("token", "weighted") if b in results]
    names = {"token": "greedy", "weighted": "weighted"}
    lines = [f"QWK on {n_essays} essays with gold scores:", "",
             "| rubric | " + " | ".join(names[b] for b in blocks) + " |", "|---" * (len(blocks) + 1) + "|"]
    for row in [*info.rubric_names, "overall", "average"]:
        lines.append(f"| {row} | " + " | ".join(f"{results[b][row]:.3f}" for b in blocks) + " |")
    token = results.get("token", {})
    if "invalid" in token:
        lines += ["", f"Invalid greedy score lines: {token['invalid']} of {n_essays} "
                      f"({token.get('truncated', 0)} cut by the token budget)."]
    return lines


def _confidence_lines(report: dict) -> list[str]:
    review = report.get("review") or {}
    test = review.get("test") or {}
    lines = [f"Signal chosen on the {report.get('n_valid')} validation essays: `{review.get('signal')}` "
             f"({review.get('selected_by')})."]
    if test:
        qwk_auto = test.get("qwk_auto")
        lines.append(f"Review rule: {100 * test.get('review_share', 0):.1f}% of the test essays go to a human; QWK on "
                     f"the rest {qwk_auto:.3f} against {review.get('test_qwk_all'):.3f} on all."
                     if qwk_auto is not None else "Review rule: every test essay goes to a human.")
    conformal = report.get("conformal")
    if conformal:
        lines.append(f"Conformal score sets ({conformal['method']}, target {conformal['target_coverage']:.0%}): "
                     f"coverage {conformal['average_coverage']:.1%}, {conformal['average_set_size']:.2f} scores per "
                     f"set on average.")
    if report.get("calibration"):
        lines.append(f"ECE of p(predicted score): {report['calibration']['ece']:.3f}.")
    return lines


def _probe_lines(manifest: dict) -> list[str]:
    probe = manifest.get("probe") or {}
    alpha = ", ".join(f"{name} {a:g}" for name, a in (probe.get("alpha") or {}).items())
    return [f"- Features: the mean of layer {probe.get('layer')} of {probe.get('layers')}'s hidden states over the "
            f"essay's first {probe.get('max_tokens')} tokens (the essay alone, no prompt), the base model frozen.",
            f"- A ridge per rubric on the standardised features, alpha by 5-fold cross-validation on the training "
            f"essays: {alpha}.",
            "- The layer with the best average QWK on the validation essays; the test essays chose nothing.",
            f"- Fitted in {(manifest.get('train') or {}).get('seconds')} s on {manifest.get('device')}."]


def run_card(run_dir: Path, manifest: dict, info: DatasetInfo, results: dict | None, n_essays: int) -> str:
    """The card's markdown for a training run (a LoRA adapter or, with ``manifest["scorer"] ==
    "probe"``, a probe) or, with ``manifest["mode"] == "score"``, a scoring run."""
    config = manifest.get("config") or {}
    base = config.get("base_model_name")
    scoring = manifest.get("mode") == "score"
    probe = manifest.get("scorer") == "probe"
    kind = "probe" if probe else "LoRA adapter"
    adapter = manifest.get("adapter_dir") if scoring else run_dir
    lines = ["---", f"base_model: {base}", f"library_name: {'aes-probe' if probe else 'peft'}",
             f"tags: [essay-scoring, {'probe' if probe else 'lora'}, qwk]", "---", "", f"# {Path(run_dir).name}", ""]
    if scoring:
        lines += [f"Scores of `{Path(str(manifest.get('score_path'))).name}` ({manifest.get('n_essays')} essays, "
                  f"{manifest.get('n_with_gold')} with gold scores) by the {kind} in `{_path_as_typed(adapter)}` "
                  f"on `{base}`, with that run's prompts (`predictions.jsonl`: per essay the scores, their "
                  f"probabilities and confidence; `scores.csv`: the final scores, confidence and review flag). "
                  f"Commit {manifest.get('git_commit')}.", ""]
    elif probe:
        lines += [f"A probe for `{base}`: a ridge per rubric on the frozen model's pooled hidden states "
                  f"(`probe.json`), trained by `main_pipeline.py --scorer probe` (commit {manifest.get('git_commit')}, "
                  f"{manifest.get('created')}).", "",
                  "## Data", "", *_data_lines(info, manifest.get("split_sizes")), "",
                  "## Training", "", *_probe_lines(manifest), ""]
    else:
        lines += [f"A LoRA adapter for `{base}` that writes one integer score per rubric for an essay, trained by "
                  f"`main_pipeline.py` (commit {manifest.get('git_commit')}, {manifest.get('created')}).", "",
                  "## Data", "", *_data_lines(info, manifest.get("split_sizes")), "",
                  "## Training", "", *_training_lines(manifest), ""]
    if results:
        lines += ["## Results", "", *_results_lines(results, info, n_essays), ""]
        if results.get("confidence"):
            lines += ["## Which scores to trust", "", *_confidence_lines(results["confidence"]), ""]
    elif not scoring:
        lines += ["## Results", "", "Not scored in this run (`--skip_scoring`, or essays without gold scores).", ""]
    lines += ["## Use", "", "Score new essays (a JSONL file of records; gold scores optional):", "", "```bash",
              _scoring_command(base, adapter), "```", "",
              f"In Python: `modules.probe_run.load_probe(\"{_path_as_typed(adapter)}\")`." if probe else
              f"In Python: `modules.models.load_adapter(\"{base}\", \"{_path_as_typed(adapter)}\")`.", ""]
    return "\n".join(lines)


def write_run_card(run_dir: Path, manifest: dict, info: DatasetInfo, results: dict | None = None,
                   n_essays: int = 0) -> Path:
    """Write :func:`run_card` as ``run_dir/README.md`` (atomically, over PEFT's empty card)."""
    path = Path(run_dir) / CARD
    write_text_atomic(path, run_card(run_dir, manifest, info, results, n_essays))
    return path
