"""Score a run's test replies again: ROUGE-L, and an LLM judge on the article's 0-100 scale.

    python scripts/score.py runs/sft/test_responses.jsonl --judge_url http://localhost:11434/v1 --judge_model llama3

For replies written where no judge could be reached (a GPU box): the file gains a judge_score per row
and the run's summary.json the means.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from hf_gpt.config import ScriptParser, UserError, run_cli  # noqa: E402
from hf_gpt.scoring import add_to_summary, score_rows, write_jsonl  # noqa: E402


def main():
    parser = ScriptParser(description=__doc__)
    parser.add_argument("responses", help="A test_responses.jsonl written by scripts/sft.py.")
    parser.add_argument("--judge_url", default="", help="OpenAI-compatible endpoint, e.g. http://localhost:11434/v1.")
    parser.add_argument("--judge_model", default="", help="The judge's model name on that server.")
    args = parser.parse_args()
    path = Path(args.responses)
    if not path.is_file():
        raise UserError(f"not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            rows.append({k: row[k] for k in ("prompt", "reference", "response")})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}: line {n}: expected a JSON object with prompt, reference and response") from None
    scores = score_rows(rows, args.judge_url, args.judge_model)
    write_jsonl(rows, path)
    wrote = [str(path)]
    if (path.parent / "summary.json").is_file():  # the run folder the replies came from
        add_to_summary(path.parent, "test", scores)
        wrote.append(str(path.parent / "summary.json"))
    print(json.dumps(scores))
    print(f"wrote {' and '.join(wrote)}")


if __name__ == "__main__":
    run_cli(main)
