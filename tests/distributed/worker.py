"""One rank of the tests' expert-parallel runs, started as ``python -m tests.distributed.worker MODE ...`` with
torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set by ``tests.distributed.launch``.

Modes: ``generate CASES.json OUT.json`` builds a ``ParallelLLM`` per case and rank 0 writes the token ids;
``cli ARGS...`` runs ``moeflow`` itself, with a registered "die-at-step" policy (an LRU whose rank ``die_rank``
kills itself, or stalls, at forward step ``die_step``) for the dead-rank tests.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from moeflow.experts.cache import PolicyContext, StepInfo, register_policy
from moeflow.experts.policies.classic import LRUPolicy


class DieAtStep(LRUPolicy):
    """LRU whose process dies (``die=kill``) or hangs (``die=stall``) at a chosen step on a chosen rank."""

    def setup(self, context: PolicyContext) -> None:
        super().setup(context)
        self.die_rank = int(context.options.get("die_rank", -1))
        self.die_step = int(context.options.get("die_step", 0))
        self.how = str(context.options.get("die", "kill"))

    def begin_step(self, info: StepInfo) -> None:
        super().begin_step(info)
        if info.step == self.die_step and int(os.environ["RANK"]) == self.die_rank:
            if self.how == "stall":
                time.sleep(3600)
            os.kill(os.getpid(), signal.SIGKILL)


def generate(cases_path: str, out_path: str) -> int:
    from moeflow.config import EngineConfig
    from moeflow.distributed.engine import parallel_llm
    from moeflow.routing.trace import Trace
    from moeflow.sampling import SamplingParams

    results = []
    for case in json.loads(Path(cases_path).read_text()):
        trace = Trace.load(case["placement_trace"]) if case.get("placement_trace") else None
        cfg = EngineConfig(device="cpu", num_slots=case.get("num_slots"), policy=case.get("policy", "lru"),
                           progress=False, decode="eager")  # fmt: skip
        llm = parallel_llm(case["model"], cfg, batch_size=case.get("batch_size", 8), placement_trace=trace)
        outs = llm.generate(case["prompts"], SamplingParams(max_tokens=case["max_tokens"]))
        results.append({"token_ids": [o.token_ids for o in outs], "slots": llm.store.num_slots,
                        "homed": len(llm.placement.keys(llm.group.rank)), "hits": outs[0].stats.hits,
                        "misses": outs[0].stats.misses})  # fmt: skip
        llm.close()
    if int(os.environ["RANK"]) == 0:
        Path(out_path).write_text(json.dumps(results))
    return 0


def main() -> int:
    mode, *rest = sys.argv[1:]
    if mode == "generate":
        return generate(*rest)
    register_policy("die-at-step", DieAtStep)
    from moeflow.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main())
