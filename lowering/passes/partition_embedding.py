"""Partition rules for embedding lookups: ``gather`` and ``embedding_bag``
from tables split row-wise or table-wise over a mesh axis."""

from __future__ import annotations

RULES: dict = {}
