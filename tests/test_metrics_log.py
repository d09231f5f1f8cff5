import json

import pytest

from hf_gpt.config import UserError
from hf_gpt.metrics_log import MetricsLog


def test_a_torn_last_line_is_dropped(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    with log.path.open("a") as f:
        f.write('{"step": 4, "lo')  # the process was killed mid-write
    assert [r["step"] for r in log.rows()] == [1, 2, 3]
    log.truncate_after(2)
    assert log.path.read_text() == "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2))


def test_a_damaged_line_before_the_last_is_an_error(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match="metrics.jsonl line 2 is not JSON"):
        log.rows()
