"""How a quantity reads to a person, the same on every surface that prints it.

Power runs from a street cabinet's 150 W to a data hall's megawatts (a budget may be up to
10^9 W): ``:g`` keeps six significant digits and turns to an exponent past them, so a hall
read ``2.4997e+06`` of ``2.5e+06`` and an operator could not tell what is left. The CLI's
tables, the scheduler's reasons and the simulator's scenario lines share this one form.
"""

from __future__ import annotations


def show_watts(value: float) -> str:
    """Watts in fixed point, to a tenth, without a trailing ``.0``: ``144``, ``49.6``,
    ``2499700``, ``1234567.8``."""
    text = f"{value:.1f}".removesuffix(".0")
    return "0" if text == "-0" else text  # a draw rounded to nothing is nothing, not "-0"
