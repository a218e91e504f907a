"""Work rules for the mx_matmul primitives (see runtime.accelerated)."""

RULES: dict = {}
