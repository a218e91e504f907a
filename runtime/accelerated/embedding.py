"""Work rules for the embedding primitives (see runtime.accelerated)."""

RULES: dict = {}
