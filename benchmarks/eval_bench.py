"""Evaluation by generation: every turn generated, against verifying the recorded turns first.

The demo's evaluation (profile `demo`: the first 20 eval sessions of the bundled CRM traces, 82
target turns, greedy, up to 56 new tokens, batch 8) of two models: the demo teacher, which answers
almost every turn as recorded (as a trained student does), and the pruned student before training,
which answers none as recorded. (a) generates every turn (`verify=False`, what the evaluation did
before); (b) first checks each recorded turn in one teacher-forced forward pass and generates only
the turns the model would not answer as recorded. The script checks that (a) and (b) give the same
verdicts, texts and token counts, and prints wall seconds, the turns generated and the speedup.

    python benchmarks/eval_bench.py [--json]

The demo teacher is made on first use (about 5 minutes, cached under ATLAS_DISTILL_CACHE).
"""

from __future__ import annotations

import argparse
import json
import time

from _common import cpu_description, log  # benchmarks/ is sys.path[0] when a script runs


def _eval_rows(profile, tokenizer) -> list[dict]:
    from atlas_distill.data import prepare_for_profile
    from atlas_distill.demo import DEMO_TRACES

    prepared = prepare_for_profile(profile, traces=str(DEMO_TRACES), tokenizer=tokenizer)
    return prepared.eval_sample(profile.trainer.eval_max_sessions)


def _measure(model, tokenizer, rows: list[dict], profile, verify: bool) -> dict:
    from atlas_distill.evaluate import evaluate_conversations

    generated = []
    generate = model.generate
    model.generate = lambda *args, **kwargs: generated.append(kwargs["input_ids"].shape[0]) or generate(*args,
                                                                                                       **kwargs)
    t = profile.trainer
    started = time.perf_counter()
    result = evaluate_conversations(model, tokenizer, [r["messages"] for r in rows], [r["reference"] for r in rows],
                                    targets=[r.get("targets") for r in rows], scorer=t.scorer,
                                    max_new_tokens=t.max_new_tokens, batch_size=t.per_device_eval_batch_size,
                                    verify=verify)
    seconds = time.perf_counter() - started
    model.generate = generate
    return {"seconds": round(seconds, 2), "turns_generated": sum(generated), "result": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="Print the figures as one JSON document.")
    args = parser.parse_args()

    import torch

    from atlas_distill import models
    from atlas_distill.config import load_profile

    profile = load_profile("demo", [], {})
    figures = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "models": {}}
    names = {"teacher": profile.teacher_model_name_or_path, "student before": profile.model.model_name_or_path}
    rows = None
    for role, spec in names.items():
        log(f"preparing {spec}")
        path = models.materialize(models.resolve_model_spec(spec, profile.model.family))
        tokenizer = models.load_tokenizer(path)
        rows = rows if rows is not None else _eval_rows(profile, tokenizer)
        model = models.load_model(path, dtype=profile.model.dtype)
        log(f"{role}: generating all {sum(len(r.get('targets') or [0]) for r in rows)} turns")
        every = _measure(model, tokenizer, rows, profile, verify=False)
        log(f"{role}: verifying first")
        verified = _measure(model, tokenizer, rows, profile, verify=True)
        same = every["result"].to_dict(include_episodes=True) == verified["result"].to_dict(include_episodes=True)
        rates = every["result"].figures().to_dict()
        figures["models"][role] = {
            "model": spec, "sessions": len(rows), "turns": sum(len(e.steps) for e in every["result"].episodes),
            "step_success_rate": rates["step_success_rate"], "identical_results": same,
            "generate_all": {k: v for k, v in every.items() if k != "result"},
            "verify_first": {k: v for k, v in verified.items() if k != "result"},
            "speedup": round(every["seconds"] / verified["seconds"], 2)}
        del model
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"CPU: {figures['cpu']}, {figures['threads']} threads")
    print(f"{'model':<16}{'turns':>6}{'step ok':>9}{'all: s':>9}{'generated':>11}{'verify: s':>11}{'generated':>11}"
          f"{'speedup':>9}  same")
    for role, f in figures["models"].items():
        print(f"{role:<16}{f['turns']:>6}{f['step_success_rate']:>9.1%}{f['generate_all']['seconds']:>9.1f}"
              f"{f['generate_all']['turns_generated']:>11}{f['verify_first']['seconds']:>11.1f}"
              f"{f['verify_first']['turns_generated']:>11}{f['speedup']:>8.2f}x  {f['identical_results']}")


if __name__ == "__main__":
    main()
