"""STUB - being written. API contract below is fixed."""
from __future__ import annotations
import random, logging
from nfqlb.config import Config

ACCEPT = 0  # accept unchanged
DROP = 1    # drop


class Engine:
    def __init__(self, config: Config, rng: random.Random | None = None,
                 log: logging.Logger | None = None) -> None:
        self.config = config

    def handle(self, data: bytes, now: float) -> bytes | int:
        return ACCEPT

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def format_stats(self) -> str:
        return ""
