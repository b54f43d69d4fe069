"""`make demo-check`: run the demo distillation and assert what the demo promises.

On the bundled eval split, judged per episode (every action and the final answer of
a session right): the teacher succeeds on >= 80 % of sessions; the pruned student
before GKD is >= 30 pp below the teacher; after `atlas-distill train --profile demo`
the student reaches >= 90 % of the teacher's episode success; the GKD run itself
(not the one-time model preparation) takes at most 10 minutes. Prints final-answer,
step and episode success for teacher, student before and student after, and the times.

    .venv/bin/python scripts/demo_check.py [extra train arguments, e.g. trainer.seed=1]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

CLI = str(Path(sys.executable).with_name("atlas-distill"))


def main() -> int:
    started = time.perf_counter()
    done = subprocess.run([CLI, "train", "--profile", "demo", "--json", *sys.argv[1:]], stdout=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        print(f"train failed with exit code {done.returncode}", file=sys.stderr)
        return done.returncode
    wall = time.perf_counter() - started
    s = json.loads(done.stdout)
    figures = {"teacher": s["teacher_eval"], "student before": s["student_before"], "student after": s["eval"]}
    teacher, before, after = (figures[k]["episode_success_rate"] for k in figures)
    prep = s["timings"]["prepare_models"]
    gkd_run = s["seconds"] - prep
    checks = {
        f"teacher episode success {teacher:.1%} >= 80%": teacher >= 0.80,
        f"student before {before:.1%} is >= 30 pp below the teacher": teacher - before >= 0.30,
        f"student after {after:.1%} >= 90% of the teacher's ({0.9 * teacher:.1%})": after >= 0.9 * teacher,
        f"GKD run {gkd_run:.0f} s <= 600 s": gkd_run <= 600,
    }
    print(f"run {s['run_dir']}: {s['steps']} steps, {s['data']['eval_used']} eval sessions; GKD run "
          f"{gkd_run:.0f} s (evaluation before {s['timings']['evaluate_before']:.0f} s, training "
          f"{s['timings']['train']:.0f} s, final evaluation and save {s['timings']['final_eval_and_save']:.0f} s); "
          f"model preparation {prep:.0f} s (first use only); whole command {wall:.0f} s")
    print(f"{'':16} {'final answer':>12} {'step':>8} {'episode':>8}")
    for name, f in figures.items():
        print(f"{name:16} {f['success_rate']:>12.1%} {f['step_success_rate']:>8.1%} {f['episode_success_rate']:>8.1%}")
    for text, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(checks.values()) else 3


if __name__ == "__main__":
    sys.exit(main())
