"""Horovod Elastic across two hosts: ``python elastic_hosts.py OUT_DIR`` under ``horovodrun --min-np 2
--max-np 4 --blacklist-cooldown-range 1 2 --host-discovery-script discover_hosts.sh`` (the hosts are whatever
$SCALING_PLUGINS_HOSTS_FILE says).

The plan, driven by rank 0 (on the first host) and bounded by STEP_LIMIT:
  4 workers on sp-n1:2 + sp-n2:2;
  after step REMOVE_AT rank 0 removes sp-n2 from the discovery file                   -> 2 workers;
  PHASE steps later it adds sp-n2 back                                                 -> 4 workers (growth);
  PHASE steps later the last rank (on sp-n2) SIGKILLs itself, once: Horovod blacklists
  sp-n2 for its cooldown                                                              -> 2 workers;
  the cooldown over, sp-n2 is back                                                    -> 4 workers;
  PHASE steps later the run ends.
"Steps" of a phase count the steps at the phase's size. Rank 0 writes every step's record (several for a step that was rolled back to the last commit) to
OUT_DIR/records.json.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import horovod.torch as hvd

from tests.horovod_scripts.elastic_common import model_and_optimizer, step_record, train_step, write_records

REMOVE_AT = 3
PHASE = 3
STEP_LIMIT = 300          # fail instead of looping forever if a change never comes
BOTH_HOSTS, FIRST_HOST = "sp-n1:2\nsp-n2:2\n", "sp-n1:2\n"
WAITING_FOR = {0: None, 1: 2, 2: 4, 3: 2, 4: 4}   # the size each phase waits for


def main() -> None:
    out_dir = Path(sys.argv[1])
    hosts_file = Path(os.environ["SCALING_PLUGINS_HOSTS_FILE"])
    killed = out_dir / "killed"
    hvd.init()
    model, opt = model_and_optimizer()
    state = hvd.elastic.TorchState(model=model, optimizer=opt, step=0, phase=0, phase_steps=0, size=0)
    records = []

    def next_phase() -> None:
        state.phase += 1
        state.phase_steps = 0

    @hvd.elastic.run
    def train(state: hvd.elastic.TorchState) -> None:
        while not (state.phase == 4 and state.size == 4 and state.phase_steps >= PHASE):
            if state.step >= STEP_LIMIT:
                raise RuntimeError(f"the plan stalled in phase {state.phase} after {STEP_LIMIT} steps")
            train_step(model, opt, state.step)
            state.step += 1
            state.phase_steps = state.phase_steps + 1 if hvd.size() == state.size else 1   # steps at this size
            state.size = hvd.size()
            records.append(step_record(opt, state.step, phase=state.phase))
            if hvd.rank() == 0:
                print(f"elastic: step {state.step} size {hvd.size()} phase {state.phase} gain {opt.gain:.3f} "
                      f"tau {opt.progress:.3f}", file=sys.stderr, flush=True)
            if state.phase == 0 and state.step == REMOVE_AT:
                next_phase()
                if hvd.rank() == 0:
                    hosts_file.write_text(FIRST_HOST)
            elif state.phase == 1 and hvd.size() == 2 and state.phase_steps >= PHASE:
                next_phase()
                if hvd.rank() == 0:
                    hosts_file.write_text(BOTH_HOSTS)
            elif state.phase == 2 and hvd.size() == 4 and state.phase_steps >= PHASE:
                next_phase()   # the kill comes in the next step
            elif state.phase == 3 and hvd.size() == 4 and hvd.rank() == 3 and not killed.exists():
                killed.write_text(f"rank 3 killed itself after step {state.step}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            elif state.phase == 3 and hvd.size() == 2:
                next_phase()
            if WAITING_FOR[state.phase] not in (None, hvd.size()):
                time.sleep(0.2)           # let the driver see the host change before the next commit
            state.commit()

    train(state)
    write_records(out_dir, records)


if __name__ == "__main__":
    main()
