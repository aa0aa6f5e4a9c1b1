"""Runtime expert management: list, add and remove experts while serving (under the admin key; see `server.py`)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from upcycle.serving.adapters import read_spec
from upcycle.serving.engine import Engine
from upcycle.serving.errors import AdapterError, Forbidden, InvalidRequest, UnknownModel

RESERVED = ("base", "auto")
_EXPERT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AddExpert(BaseModel):
    id: str
    """The model name clients will use."""
    path: str
    """A PEFT LoRA directory inside one of the server's adapter roots."""


def allowed_path(path: str, roots: Sequence[str | Path]) -> Path:
    """`path` resolved, if it lies inside one of `roots`; otherwise Forbidden, the same answer whether or not it
    exists, so the endpoint cannot be used to probe the server's files.

    The lexical check comes first, so nothing outside the roots is even looked at; the resolved check then refuses
    symlinks that lead out.
    """
    refused = Forbidden("adapters can only be added from this server's adapter roots (upcycle serve "
                        "--server.adapter_roots; the run directory by default), and this path is not inside them",
                        param="path")
    try:
        lexical = Path(os.path.abspath(path))
        if not any(lexical.is_relative_to(os.path.abspath(root)) for root in roots):
            raise refused
        resolved = lexical.resolve()
    except (OSError, ValueError, RuntimeError):  # NUL bytes, unencodable names, symlink loops
        raise refused from None
    if not any(resolved.is_relative_to(Path(root).resolve()) for root in roots):
        raise refused
    return resolved


def admin_routes(engine: Engine, require_key: Callable, roots: Sequence[str | Path] = ()) -> APIRouter:
    """GET /admin/experts (ids and tiers), POST /admin/experts {id, path}, DELETE /admin/experts/{id}.

    Added adapters must lie inside `roots`. A removed expert's waiting requests fail with 410 (expert_removed);
    rows already generating finish.
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
            raise InvalidRequest(f"'{body.id}' is not a valid expert id (letters, digits, '.', '_', '-'; not base "
                                 "or auto)", param="id")
        path = allowed_path(body.path, roots)
        try:
            read_spec(path)  # refuse a bad directory now rather than at its first request
        except AdapterError as error:
            raise InvalidRequest(error.message, param="path") from None
        return {"id": body.id, "path": str(path), "changed": engine.cache.register(body.id, path)}

    @router.delete("/experts/{expert}")
    async def remove_expert(expert: str) -> dict[str, Any]:
        if engine.cache is None or not engine.cache.unregister(expert):
            raise UnknownModel(f"the model '{expert}' does not exist", param="model")
        return {"id": expert, "removed": True}

    return router
