"""The site's ``[staging]`` table (schemas/site.schema.json) as one object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class StagingSettings:
    retries: int = 3
    backoff_s: float = 2.0
    timeout_s: int = 120
    parallel: int = 4
    max_file_gib: float = 100.0
    readback: bool = True
    s3: Mapping[str, str] = field(default_factory=dict)
    http: Mapping[str, Any] = field(default_factory=dict)

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_gib * (1 << 30))

    @classmethod
    def from_site(cls, table: Mapping[str, Any]) -> "StagingSettings":
        return cls(**table)
