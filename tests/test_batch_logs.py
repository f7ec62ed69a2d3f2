"""Progress in a batch job's log (a file, not a terminal): plain periodic lines naming node and rank."""
import io
import socket

from scaling_plugins.app.training import ProgressLines, RunSpec, _progress_bar


def test_progress_lines_each_tenth_and_at_the_end():
    spec = RunSpec(name="adascale", workload="quadratic", workers=4, budget=100)
    stream = io.StringIO()
    lines = ProgressLines(spec, rank=0, stream=stream)
    for step in range(40):                     # 2.5 base steps per optimizer step: a tenth every 4 steps
        lines.update(2.5)
        lines.set_postfix(loss=f"{1.0 / (step + 1):.3f}", lr="0.1", gain="2.50")
    lines.close()
    text = stream.getvalue()
    assert "\r" not in text
    rows = text.splitlines()
    assert len(rows) == 10
    assert rows[0] == f"progress {socket.gethostname()} rank 0 | adascale S=4 | 10/100 base steps, step 4 | " \
                      "loss 0.250 lr 0.1 gain 2.50"
    assert rows[-1].startswith(f"progress {socket.gethostname()} rank 0 | adascale S=4 | 100/100 base steps, step 40")


def test_a_run_that_stops_between_tenths_still_ends_with_a_line():
    stream = io.StringIO()
    lines = ProgressLines(RunSpec(name="r", workload="quadratic", workers=2, budget=10), rank=0, stream=stream)
    lines.update(0.5)
    lines.set_postfix(loss="1", lr="2", gain="1")
    lines.close()
    assert stream.getvalue().splitlines() == [f"progress {socket.gethostname()} rank 0 | r S=2 | 0.5/10 base steps, "
                                              "step 1 | loss 1 lr 2 gain 1"]


def test_no_terminal_means_lines_not_a_bar(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())   # what a batch job's stderr is: not a tty
    assert isinstance(_progress_bar(RunSpec(name="r", workload="quadratic", budget=8), 0, enabled=True), ProgressLines)
