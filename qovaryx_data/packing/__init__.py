"""The pack compiler's parts (the entry point is `qovaryx_data.packer.pack`).

    plan.py    planning: work units, the inputs' fingerprint, "up to date", the output lock
    executors.py  where units run, chosen by name: "local" (pool.py) or "ray" (ray_executor.py)
    pool.py    the worker pool: units in, finished parts out, in unit order
    ray_executor.py  the same units as Ray tasks (the optional extra qovaryx[ray])
    units.py   the worker side: one unit's rows -> a part file (tokens, metadata, pixels)

The shard writer, which mirrors reader.py, is `qovaryx_data.writer`. (The package is not called
`pack`: importing it would shadow the function `qovaryx_data.pack`.)
"""
