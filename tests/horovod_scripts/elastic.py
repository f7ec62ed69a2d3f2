"""A real Horovod Elastic run that shrinks from 2 workers to 1: ``python elastic.py OUT_DIR``.

Launched by tests/test_horovod_elastic.py with ``horovodrun -np 2 --min-np 1 --host-discovery-script
discover_hosts.sh``; the discovery script prints the file $SCALING_PLUGINS_HOSTS_FILE, which rank 0 rewrites
from "localhost:2" to "localhost:1" after SHRINK_AT steps. Training goes on until SMALL_STEPS steps ran on
the single remaining worker; that worker writes every step's record to OUT_DIR/records.json.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import horovod.torch as hvd

from tests.horovod_scripts.elastic_common import model_and_optimizer, step_record, train_step, write_records

SHRINK_AT = 4
SMALL_STEPS = 4
STEP_LIMIT = 200          # fail instead of looping forever if the shrink never comes


def main() -> None:
    out_dir = Path(sys.argv[1])
    hvd.init()
    model, opt = model_and_optimizer()
    state = hvd.elastic.TorchState(model=model, optimizer=opt, step=0, small_steps=0)
    records = []

    @hvd.elastic.run
    def train(state: hvd.elastic.TorchState) -> None:
        while state.small_steps < SMALL_STEPS:
            if state.step >= STEP_LIMIT:
                raise RuntimeError(f"no shrink to 1 worker after {STEP_LIMIT} steps")
            loss = train_step(model, opt, state.step)
            state.step += 1
            state.small_steps += hvd.size() == 1
            records.append(step_record(opt, state.step, loss=loss))
            if state.step == SHRINK_AT and hvd.rank() == 0:
                Path(os.environ["SCALING_PLUGINS_HOSTS_FILE"]).write_text("localhost:1\n")
            if state.step >= SHRINK_AT and hvd.size() > 1:
                time.sleep(0.2)            # let the driver see the new hosts before the next commit
            state.commit()

    train(state)
    write_records(out_dir, records)


if __name__ == "__main__":
    main()
