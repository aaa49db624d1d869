"""`memcli serve`'s OpenAI-compatible routes: every pool is a model.

    GET  /v1/models                  one model per pool (GET /v1/models/{pool}: one)
    POST /v1/chat/completions        `wire.ChatRequest`: "model" names the pool; SSE when "stream": true

A conversation is fitted to the model's window as the native ask fits its turns
(`memcli.app.asking.conversation_prompt`) and decoded by the same code (`decode_answer`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time

from starlette.requests import Request
from starlette.responses import JSONResponse

from memcli.server.bodies import check_pool_name, read_json
from memcli.wire import ChatRequest


def routes(server) -> list[tuple]:
    """(path, handler, methods) of the OpenAI routes, served by `server` (memcli.server.http.Server)."""
    api = OpenAI(server)
    return [("/v1/models", api.models, ["GET"]), ("/v1/models/{name:path}", api.model, ["GET"]),
            ("/v1/chat/completions", api.chat_completions, ["POST"])]


def model_entry(row: dict) -> dict:
    """A pool as an OpenAI model."""
    return {"id": row["name"], "object": "model", "created": _epoch(row.get("created")), "owned_by": "memcli",
            "memcli_model": row.get("model")}


def _epoch(iso: str | None) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(iso).timestamp()) if iso else 0
    except (TypeError, ValueError):
        return 0


def sse(item: dict) -> bytes:
    if "error" in item:  # the OpenAI client raises an APIError for an event with an error field
        return f"data: {json.dumps({'error': item['error']})}\n\n".encode()
    return f"data: {json.dumps(item)}\n\n".encode()


class OpenAI:
    def __init__(self, server):
        self.server = server

    async def models(self, request: Request):
        rows = await asyncio.to_thread(lambda: self.server.library().list_pools())
        return JSONResponse({"object": "list", "data": [model_entry(row) for row in rows if not row.get("error")]})

    async def model(self, request: Request):
        from memcli.store import PoolNotFound
        from memcli.wire import BadRequest

        name = request.path_params["name"]
        if not name:
            raise BadRequest("model must name a pool")
        check_pool_name(name)
        self.server.require_pool(name)  # the one wording of a missing pool
        rows = await asyncio.to_thread(lambda: self.server.library().list_pools())
        for row in rows:
            if row["name"] == name and not row.get("error"):
                return JSONResponse(model_entry(row))
        raise PoolNotFound(f"pool {name} not found")

    async def chat_completions(self, request: Request):
        from memcli.app.answer_log import log_answer
        from memcli.app.asking import answer_budget, conversation_prompt, decode_answer

        chat = ChatRequest.from_json(await read_json(request), check_pool=check_pool_name)
        server, resident = self.server, self.server.resident
        server.require_pool(chat.pool)
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": chat.pool,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        def work(job, emit):
            model = resident.use_model(resident.model_of(chat.pool))
            try:
                loaded = model.app.model(model.name)
                ids, _ = conversation_prompt(loaded, chat.messages, chat.max_tokens)
                budget = answer_budget(loaded, len(ids), chat.max_tokens, option="max_tokens")
                with job.holding(resident.reader_lock(model.name, chat.pool)):  # one answer per pool state at a time
                    pool = resident.loaded_pool(model, chat.pool)
                    if chat.stream:
                        emit(chunk({"role": "assistant", "content": ""}))
                    on_text = (lambda text: emit(chunk({"content": text}))) if chat.stream else None
                    answer = decode_answer(loaded, pool.state, ids, budget, sampling=chat.sampling, on_text=on_text,
                                           stop=chat.stop, checkpoint=lambda: job.checkpoint("token"))
                    answer.pool, answer.pool_version = chat.pool, pool.version
            finally:
                resident.done_with(model)
            server.metrics.answered("/v1/chat/completions", answer)
            answer.question = next((m["content"] for m in reversed(chat.messages) if m["role"] == "user"), "")
            log_answer(answer, via="openai", sampling=chat.sampling)  # before the answer's last line goes out
            finish_reason = "stop" if answer.stopped else "length"
            usage = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.new_tokens,
                     "total_tokens": answer.prompt_tokens + answer.new_tokens}
            if chat.stream:
                emit(chunk({}, finish_reason))
                if chat.include_usage:
                    emit({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                          "model": chat.pool, "choices": [], "usage": usage})
            else:
                emit({"id": completion_id, "object": "chat.completion", "created": created, "model": chat.pool,
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                                   "finish_reason": finish_reason, "logprobs": None}],
                      "usage": usage})

        if chat.stream:
            return server.stream(request, work, sse, "text/event-stream", tail=b"data: [DONE]\n\n", kind="chat",
                                 pool=chat.pool)
        return await server.complete(request, work, kind="chat", pool=chat.pool)
