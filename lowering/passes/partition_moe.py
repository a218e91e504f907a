"""Partition rules for ``moe_ffn`` (expert parallelism with all-to-all
dispatch) and ``mx_matmul``."""

from __future__ import annotations

RULES: dict = {}
