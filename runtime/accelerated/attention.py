"""Work rules for the attention primitives (see runtime.accelerated)."""

RULES: dict = {}
