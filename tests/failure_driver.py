"""Test-only driver for tests/test_failures.py: real processes for races and signals.

``python tests/failure_driver.py race ROUNDS OUTPUT_DIR -- CLI FLAGS``
    imports gqaprune once, then per round forks two children that wait on one pipe and run
    ``cli.main`` on the same run name at the same moment (ratios 0.3 and 0.5), and prints one
    JSON line per round: both exit statuses and stderr tails. The parent runs no torch code
    before forking, so the children start in milliseconds instead of re-importing torch.

``python tests/failure_driver.py slow-save MARKER -- CLI FLAGS``
    runs ``cli.main`` with :meth:`PruningPlan.save` wrapped: once the plan is written into the
    checkpoint's hidden staging folder (the weights are there already), it creates MARKER and
    sleeps, so the test can send a signal *during the save*. The production code has no such
    hook; this wrapper is the only slowing.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path


def _child(read_end: int, argv: list[str], err_path: str) -> None:
    from gqaprune_core import cli

    os.read(read_end, 1)  # the start signal: both children begin together
    buffer = io.StringIO()
    with redirect_stderr(buffer):
        code = cli.main(argv)
    Path(err_path).write_text(buffer.getvalue())
    os._exit(code)


def race(rounds: int, output_dir: str, flags: list[str]) -> None:
    # imported once, before forking (no torch code runs here: forked OpenMP pools can hang)
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import gqaprune_core.checkpoint  # noqa: F401
    import gqaprune_core.cli  # noqa: F401
    import gqaprune_core.pipeline  # noqa: F401
    import gqaprune_core.tiny  # noqa: F401

    for number in range(rounds):
        read_end, write_end = os.pipe()
        children = []
        for ratio in ("0.3", "0.5"):
            argv = [*flags, "--pruning_ratio", ratio, "--output_dir", output_dir,
                    "--save_ckpt_log_name", f"race{number}"]
            err_path = os.path.join(output_dir, f".err-{number}-{ratio}")
            pid = os.fork()
            if pid == 0:
                _child(read_end, argv, err_path)
            children.append((pid, ratio, err_path))
        os.write(write_end, b"go")
        result = {"round": number}
        for pid, ratio, err_path in children:
            _, status = os.waitpid(pid, 0)
            result[ratio] = {"code": os.waitstatus_to_exitcode(status),
                             "err": Path(err_path).read_text() if os.path.exists(err_path)
                             else ""}
        os.close(read_end)
        os.close(write_end)
        print(json.dumps(result), flush=True)


def slow_save(marker: str, flags: list[str]) -> int:
    from gqaprune_core import cli
    from gqaprune_core.plan import PruningPlan

    original = PruningPlan.save

    def save_then_wait(self, path, *args, **kwargs):
        result = original(self, path, *args, **kwargs)
        Path(marker).write_text(str(path))
        time.sleep(60)
        return result

    PruningPlan.save = save_then_wait
    return cli.main(flags)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    split = rest.index("--")
    head, cli_flags = rest[:split], rest[split + 1:]
    if command == "race":
        race(int(head[0]), head[1], cli_flags)
    elif command == "slow-save":
        sys.exit(slow_save(head[0], cli_flags))
    else:
        sys.exit(f"unknown command {command!r}")
