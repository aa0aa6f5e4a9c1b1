"""Runtime expert management: list, add and remove experts while serving (under the server's API key)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from upcycle.serving.adapters import read_spec
from upcycle.serving.engine import Engine
from upcycle.serving.errors import AdapterError, InvalidRequest, UnknownModel

RESERVED = ("base", "auto")
_EXPERT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AddExpert(BaseModel):
    id: str
    """The model name clients will use."""
    path: str
    """A PEFT LoRA directory readable by the server."""


def admin_routes(engine: Engine, require_key: Callable) -> APIRouter:
    """GET /admin/experts (ids and tiers), POST /admin/experts {id, path}, DELETE /admin/experts/{id}.

    A removed expert's waiting requests fail with 410 (expert_removed); rows already generating finish.
    """
    router = APIRouter(prefix="/admin", dependencies=[Depends(require_key)])

    @router.get("/experts")
    async def list_experts() -> dict[str, Any]:
        cache = engine.cache
        if cache is None:
            return {"experts": [], "cache": {}}
        return {"experts": [{"id": e, "tier": cache.tier_of(e)} for e in cache.experts()], "cache": cache.snapshot()}

    @router.post("/experts", status_code=201)
    async def add_expert(body: AddExpert) -> dict[str, Any]:
        if engine.cache is None:
            raise InvalidRequest("this server has no adapter cache")
        if not _EXPERT_ID.match(body.id) or body.id in RESERVED:
            raise InvalidRequest(f"'{body.id}' is not a valid expert id", param="id")
        try:
            read_spec(body.path)  # refuse a bad directory now rather than at its first request
        except AdapterError as error:
            raise InvalidRequest(error.message, param="path") from None
        return {"id": body.id, "path": body.path, "changed": engine.cache.register(body.id, body.path)}

    @router.delete("/experts/{expert}")
    async def remove_expert(expert: str) -> dict[str, Any]:
        if engine.cache is None or not engine.cache.unregister(expert):
            raise UnknownModel(f"the model '{expert}' does not exist", param="model")
        return {"id": expert, "removed": True}

    return router
