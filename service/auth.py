"""Bearer-token authentication and tenants.

A token file has one token per line, optionally preceded by a tenant name: ``TENANT TOKEN`` (or just
``TOKEN``, tenant ``default``); blank lines and ``#`` comments are ignored. Each tenant sees only its own jobs
and uploads. Without a token file the server is open and everyone is tenant ``default``.

The interceptor rejects missing or wrong tokens with UNAUTHENTICATED before any servicer code runs; tokens are
compared with :func:`hmac.compare_digest` against every known token, so timing reveals neither a token's
prefix nor which tenant matched. Health checks stay open so load balancers can probe the server.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from onnxprune.errors import BadInputError
from onnxprune.service.logs import log_event

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def load_tokens(path: Path) -> dict[str, str]:
    """Parse a token file into token → tenant.

    Raises:
        BadInputError: unreadable file, malformed line, duplicate token, or no token at all.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise BadInputError(f"cannot read token file {path}: {e}", field="token_file") from e
    tokens: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) > 2:
            raise BadInputError(f"{path}:{number}: expected 'TENANT TOKEN' or 'TOKEN'", field="token_file")
        tenant, token = (parts[0], parts[1]) if len(parts) == 2 else (DEFAULT_TENANT, parts[0])
        if token in tokens:
            raise BadInputError(f"{path}:{number}: duplicate token", field="token_file")
        tokens[token] = tenant
    if not tokens:
        raise BadInputError(f"token file {path} holds no token", field="token_file")
    return tokens


class Authenticator:
    """Resolves the tenant of a request from its ``authorization: Bearer …`` metadata."""

    def __init__(self, tokens: Mapping[str, str] | None) -> None:
        self._tokens = [(t.encode(), tenant) for t, tenant in (tokens or {}).items()]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def tenant(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        """The tenant for these request headers; None when auth is on and the token is missing or wrong."""
        if not self._tokens:
            return DEFAULT_TENANT
        presented = b""
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else str(value)
                scheme, _, credential = text.partition(" ")
                if scheme.lower() == "bearer":
                    presented = credential.strip().encode()
        match = None
        for token, tenant in self._tokens:  # no early exit: constant time over the token list
            if hmac.compare_digest(token, presented) and presented:
                match = tenant
        return match

    def tenant_of(self, context: grpc.ServicerContext) -> str:
        """The tenant of an authenticated call (the interceptor already rejected bad tokens)."""
        tenant = self.tenant(context.invocation_metadata())
        if tenant is None:  # only reachable if the interceptor was not installed
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        return tenant  # type: ignore[return-value]


def _deny(kind: Callable[..., grpc.RpcMethodHandler], streaming_response: bool) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    def abort_stream(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        yield  # pragma: no cover - makes this a generator

    return kind(abort_stream if streaming_response else abort)


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a valid token (except health checks) with UNAUTHENTICATED."""

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if not self._auth.enabled or details.method.startswith(OPEN_METHOD_PREFIXES):
            return continuation(details)
        if self._auth.tenant(details.invocation_metadata) is not None:
            return continuation(details)
        log_event(log, "rpc.unauthenticated", logging.WARNING, method=details.method)
        handler = continuation(details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return _deny(grpc.stream_stream_rpc_method_handler, True)
        if handler.request_streaming:
            return _deny(grpc.stream_unary_rpc_method_handler, False)
        if handler.response_streaming:
            return _deny(grpc.unary_stream_rpc_method_handler, True)
        return _deny(grpc.unary_unary_rpc_method_handler, False)
