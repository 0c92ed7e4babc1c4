#!/usr/bin/env python3
"""Print every scalar of a TensorBoard log folder as JSON, read by TensorBoard's own
event reader (the `tensorboard` package's EventAccumulator): {tag: [[step, value,
wall_time], ...]} in reading order. mixlm's tests use it to check its event files
against metrics.jsonl with a real client.

    python3 scripts/tensorboard_scalars.py runs/demo/tensorboard
"""
import json
import sys

from tensorboard.backend.event_processing import event_accumulator


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: tensorboard_scalars.py LOGDIR")
    acc = event_accumulator.EventAccumulator(
        sys.argv[1], size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    out = {
        tag: [[e.step, e.value, e.wall_time] for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
