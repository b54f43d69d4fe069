"""`make demo-check`: run the demo distillation and assert what the demo promises.

On the bundled eval split: the teacher succeeds on >= 60 % of sessions; the
pruned student before GKD is >= 30 pp below the teacher; after
`atlas-distill train --profile demo` the student gains >= 20 pp. Also prints
the wall time of the GKD run and of the first-time preparation.

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
    teacher, before, after = (s["teacher_eval"]["success_rate"], s["student_before"]["success_rate"],
                              s["eval"]["success_rate"])
    checks = {
        f"teacher success {teacher:.1%} >= 60%": teacher >= 0.60,
        f"student before {before:.1%} is >= 30 pp below the teacher": teacher - before >= 0.30,
        f"student after {after:.1%} >= before + 20 pp": after - before >= 0.20,
    }
    prep = s["timings"]["prepare_models"]
    print(f"run {s['run_dir']}: {s['steps']} steps, {s['data']['eval_used']} eval sessions; GKD run "
          f"{s['seconds'] - prep:.0f} s (evaluation before {s['timings']['evaluate_before']:.0f} s, training and "
          f"final evaluation {s['timings']['train']:.0f} s); model preparation {prep:.0f} s (first use only); "
          f"whole command {wall:.0f} s")
    for text, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(checks.values()) else 3


if __name__ == "__main__":
    sys.exit(main())
