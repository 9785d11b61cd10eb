"""`ErrorInterceptor`: the one place where exceptions become gRPC status codes.

`KvstashError` subclasses map to their `code` (with trailing metadata `retry-after-ms` when the error
carries a retry hint); anything else becomes INTERNAL with a generic message (the details go to the
log, never to the client). Every call is counted in `kvstash_requests_total`.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from services.errors import InvalidArgument, KvstashError
from services.metrics import GatewayMetrics

log = logging.getLogger(__name__)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: GatewayMetrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        # Requests arrive as bytes and are parsed inside the wrapped handler, so a message that does not
        # parse (e.g. invalid UTF-8 in a string field) is INVALID_ARGUMENT rather than grpc's INTERNAL.
        parse = handler.request_deserializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, parse), response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, parse), response_serializer=handler.response_serializer)
        return handler

    async def _fail(self, context, method: str, e: Exception) -> None:
        if isinstance(e, KvstashError):
            code, message = grpc.StatusCode[e.code], e.message
            if e.retry_after_s is not None:  # a hint for clients that back off (RESOURCE_EXHAUSTED, UNAVAILABLE)
                context.set_trailing_metadata((("retry-after-ms", str(int(e.retry_after_s * 1000))),))
        else:
            log.error("%s failed", method, exc_info=e)
            code, message = grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__})"
        self.metrics.requests.labels(method, code.name).inc()
        await context.abort(code, message)

    def _wrap_unary(self, inner, method: str, parse):
        async def handler(raw, context):
            try:
                response = await inner(_parse(parse, raw), context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:  # noqa: BLE001
                await self._fail(context, method, e)
            self.metrics.requests.labels(method, "OK").inc()
            return response
        return handler

    def _wrap_stream(self, inner, method: str, parse):
        async def handler(raw, context):
            try:
                async for response in inner(_parse(parse, raw), context):
                    yield response
            except (asyncio.CancelledError, grpc.aio.AbortError):
                self.metrics.requests.labels(method, "CANCELLED").inc()
                raise
            except Exception as e:  # noqa: BLE001
                await self._fail(context, method, e)
            self.metrics.requests.labels(method, "OK").inc()
        return handler


def _parse(parse, raw: bytes):
    if parse is None:
        return raw
    try:
        return parse(raw)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError and friends
        raise InvalidArgument(f"the request is not a valid message of this method: {type(e).__name__}") from None
