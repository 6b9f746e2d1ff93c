"""The experiments: the tutorial's studies as config-driven runs.

config -> data, models, optimizers -> train (solo) / batched (many seeds as one model)
-> recording (the monitor's tables) -> outputs (the one writer of a finished run directory)
-> rundir (directories and files); solo.py runs one config start to finish; sweeps/ runs grids.
"""
