"""The names of the monitor's statistic columns, in one place.

Each part's ``read`` fills rows with these keys, in this order; ``Window`` holds the rows and
TensorBoard gets them as ``grad/<param>/<column>``, ``weight/<param>/<column>`` and
``activation/<module>/<column>``.
"""

from __future__ import annotations

# A parameter's gradient row (Window.gradients[name]): means over the window's steps of each
# step's value; zero_fraction and nonfinite over every element of every applied step.
GRADIENT_MOMENTS = ("mean", "mean_abs", "norm", "max_abs")       # the device sums' columns, in order
GRADIENT = (*GRADIENT_MOMENTS, "zero_fraction", "nonfinite")     # also TensorBoard scalars
GRADIENT_COUNTS = ("steps", "skipped_steps")                     # in the row only
# A parameter's weight row (Window.weights[name]); joined to its gradient row as weight_<column>.
WEIGHT = ("l1", "norm", "update_ratio")
# An activation module's row (Window.activations[name]); the last two only where they apply.
ACTIVATION = ("mean", "std", "saturated_fraction", "dead_fraction")
# A gate's row (Window.gates[param][gate]).
GATE = ("norm", "weight_norm", "steps")
# The window's own row (Window.overall), and what clipping adds to it.
OVERALL = ("steps", "skipped_steps", "total_norm", "total_norm_max")
CLIPPING = ("total_norm_before_clip", "clipped_steps", "clip_calls")

# The sign/exponent histogram's layout: a counts row has SIGN_EXPONENT_BINS columns, one per
# (sign, float32 biased exponent); stats.py (torch) and kernels.py (numba) both count into it.
EXPONENTS = 256                  # values of a float32's biased exponent field
SIGN_EXPONENT_BINS = 2 * EXPONENTS
