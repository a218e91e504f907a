"""Work rules for the norms primitives (see runtime.accelerated)."""

RULES: dict = {}
