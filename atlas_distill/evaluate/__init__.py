"""Evaluation: score generated turns, measure success rates and tokens, compare with the baseline.

Every target turn of an eval conversation (each action of the agent and the final answer; a
row without `targets` has its last turn only) is generated greedily from the recorded
conversation before it and judged against the recorded turn:
- `eval/success_rate`: the share of conversations whose final answer is judged right (by the
  configured scorer), as before multi-turn evaluation existed;
- `eval/step_success_rate`: the share of all target turns judged right (actions by `auto`: same
  tool and equal arguments for a tool call, the number for a number, else the text);
- `eval/episode_success_rate`: the share of conversations whose every target turn is right;
- `eval/avg_tokens`: tokens the model generates per episode (all its turns), up to each EOS.
A turn the model would answer exactly as recorded is found in one teacher-forced forward pass and
not generated (`generate_answers`), so a model that is mostly right is evaluated several times faster.
`compute_baseline_summary` turns success rate and tokens into the Baseline Comparison of DESIGN §4.

Modules: `scoring` (one answer against its reference), `results` (verdicts and rates; target turns as
prompts), `generation` (batched greedy generation, verification, `evaluate_conversations`), `baseline`
(the Baseline Comparison and upstream's console lines), `models` (`compare --model`: models evaluated on
the spot). None imports torch at import time.
"""

from ..gkd.settings import SCORERS
from .baseline import baseline_summary, compute_baseline_summary, format_baseline_line, format_reference_line
from .generation import evaluate_conversations, generate_answers
from .results import Episode, EvalResult, Generation, episode_turns, judge, turn_prompts
from .scoring import extract_json, extract_number, resolve_scorer, score

__all__ = ["SCORERS", "Episode", "EvalResult", "Generation", "baseline_summary", "compute_baseline_summary",
           "episode_turns", "evaluate_conversations", "extract_json", "extract_number", "format_baseline_line",
           "format_reference_line", "generate_answers", "judge", "resolve_scorer", "score", "turn_prompts"]
