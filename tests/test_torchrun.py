"""The DDP backend under the real torchrun launcher (2 local ranks, gloo)."""
import json

import pytest

from tools.launchers import REPO, torchrun


def test_torchrun_two_ranks_reach_the_golden_gain_and_agree(tmp_path):
    torchrun(REPO / "tests/ddp_scripts/golden.py", [str(tmp_path)], timeout=300)
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for row in rows:
        assert row["world"] == 2
        assert row["gains"][0] == pytest.approx(4 / 3)      # the same inputs every step keep the gain at 4/3
        assert row["gains"][-1] == pytest.approx(4 / 3)
        assert row["progress"] == pytest.approx(4.0)
    assert rows[0]["gains"] == rows[1]["gains"] and rows[0]["lr"] == rows[1]["lr"]
