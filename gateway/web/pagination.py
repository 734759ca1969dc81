"""Lists are paged by ``limit``/``offset``; each page says the total and links the next one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.web.types import Offset

MAX_LIMIT = 500
DEFAULT_LIMIT = 50

T = TypeVar("T")


class PageParams(BaseModel):
    """Query parameters of every list; subclass it to add a list's filters."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="items per page")
    offset: Offset = Field(default=0, description="items to skip (at most 2**31-1)")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
    #: The URL of the next page (same filters), or null on the last one.
    next: str | None


def page(request: web.Request, items: Sequence[Any], total: int, params: PageParams) -> dict[str, Any]:
    """The page body; ``next`` keeps the request's filters and moves the offset."""
    following = params.offset + params.limit
    next_url = None
    if following < total:
        next_url = str(request.rel_url.update_query(limit=params.limit, offset=following))
    return {"items": list(items), "total": total, "limit": params.limit, "offset": params.offset, "next": next_url}
