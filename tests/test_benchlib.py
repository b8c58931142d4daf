"""scripts/benchlib.py: interleaved repeats, failures exit non-zero, ratios claimed only outside the spreads."""

import pytest

from scripts.benchlib import Spread, ratio, run_interleaved

CHILD = """
import json, sys
spec = json.loads(sys.argv[2])
with open(spec["log"], "a") as f:
    f.write(spec["name"] + "\\n")
if spec.get("fail"):
    sys.exit(3)
print("RESULT " + json.dumps({"value": spec["value"]}))
"""


def test_runs_are_interleaved_and_a_failure_exits_non_zero(tmp_path):
    script, log = tmp_path / "child.py", tmp_path / "order.txt"
    script.write_text(CHILD)
    specs = [dict(name=n, value=v, log=str(log)) for n, v in (("A", 1), ("B", 2))]
    results = run_interleaved(str(script), specs, repeats=2, label=lambda s: s["name"])
    assert log.read_text().split() == ["A", "B", "A", "B"]
    assert results == [[{"value": 1}] * 2, [{"value": 2}] * 2]
    with pytest.raises(SystemExit) as failed:
        run_interleaved(str(script), [*specs, dict(name="C", value=0, log=str(log), fail=True)], repeats=1)
    assert "FAILED" in str(failed.value.code)  # sys.exit(message): exit status 1


def test_ratio_only_where_spreads_do_not_overlap():
    fast, slow, noisy = Spread((10.0, 11.0, 10.5)), Spread((5.0, 5.5, 5.2)), Spread((4.0, 12.0, 6.0))
    assert fast.median == 10.5 and (fast.low, fast.high) == (10.0, 11.0)
    assert ratio(fast, slow) == f"{10.5 / 5.2:.3f}x"
    assert ratio(slow, fast) == f"{5.2 / 10.5:.3f}x"
    assert ratio(fast, noisy).startswith("not resolved") and f"{10.0 / 12.0:.3f}" in ratio(fast, noisy)
