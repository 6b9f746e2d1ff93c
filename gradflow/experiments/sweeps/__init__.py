"""Sweeps: many seeds per point over a grid of config overrides, as one table and one picture.

    grid.py       the sweep file, its grid of configs, and the plan (runs that share a batched model)
    executors.py  where tasks run: in-process, a process pool, or Ray
    results.py    results.csv, statistics over seeds, summary.md and sweep.png
    runner.py     the sweep directory and ``run_sweep`` (resumes where it stopped)
    seeds.py      ``gradflow train CONFIG --seeds 0-9``
"""
