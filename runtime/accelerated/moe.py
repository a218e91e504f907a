"""Work rules for the moe primitives (see runtime.accelerated)."""

RULES: dict = {}
