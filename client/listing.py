"""A job's selection of its inputs: each distinct id numbered in listing order, repeats and done ids left out."""

from __future__ import annotations

from collections.abc import Container, Iterator
from typing import Any

from client.errors import ItemError
from client.sources import Inputs, Tally

_INVALID_ARGUMENT = 3


class Listing:
    """The `select` of a job's inputs: numbers each distinct id (its output position), drops repeats and done ids."""

    def __init__(self, skip: Container[str]) -> None:
        self.skip = skip
        self.positions: dict[str, int] = {}
        self.repeated = 0
        self.repeated_examples: list[str] = []
        self.skipped = 0
        self.tally = Tally()

    def __call__(self, image_id: str) -> bool:
        if image_id in self.positions:
            self.repeated += 1
            if len(self.repeated_examples) < 3:
                self.repeated_examples.append(image_id)
            return False
        self.positions[image_id] = len(self.positions)
        if image_id in self.skip:
            self.skipped += 1
            return False
        return True


class Skip:
    """Ids with a row, and (unless retried) ids that failed before."""

    def __init__(self, done: set[str], failed: dict[str, ItemError] | None) -> None:
        self.done, self.failed = done, failed

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.done or (self.failed is not None and image_id in self.failed)


def pairs(inputs: Inputs, listing: Listing, line_ids_only: bool) -> Iterator[tuple[str, Any]]:
    """The selected inputs as `(id, image)`; an id an ids file cannot hold fails here, not at the end."""
    for source in inputs.sources(listing, listing.tally):
        if line_ids_only and ("\n" in source.id or "\r" in source.id):
            message = "the id has a line break, which an .ids.txt file cannot hold; write .parquet or .npz"
            yield source.id, ItemError(_INVALID_ARGUMENT, message)
        else:
            yield source.id, source.image
