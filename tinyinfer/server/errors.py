"""Errors as OpenAI's API gives them: a status code and `{"error": {message, type, param, code}}`.

Clients (the official `openai` package among them) read that body to raise their own
exceptions, so every error the server returns has this shape, whoever raised it: our handlers
(APIError), FastAPI's validation of the request body (a 422 there, a 400 here, as OpenAI
answers a malformed request), Starlette's 404 and 405 for unknown paths and methods, and any
bug (500).

| status | type | when |
| --- | --- | --- |
| 400 | invalid_request_error | a bad parameter, a prompt past the context window |
| 401 | invalid_request_error (code invalid_api_key) | a missing or wrong API key |
| 404 | invalid_request_error (code model_not_found) | a model this server does not serve |
| 413 | invalid_request_error (code request_too_large) | a body over the size limit |
| 503 | server_error (code queue_full, Retry-After) | too many requests waiting |
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tinyinfer.errors import ContextLengthError, KVCacheTooSmallError, TokenizerMissingError

logger = logging.getLogger("tinyinfer.server")


class APIError(Exception):
    """An error to send to the client, with OpenAI's fields; `headers` go out with it
    (Retry-After, WWW-Authenticate)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def refused_request(error: Exception, prompt_param: str) -> APIError:
    """What the library said when it refused a request (LLM.prompt_ids, LLMEngine.add_request,
    SamplingParams), as a 400 that names the parameter at fault. prompt_param: "prompt" or
    "messages", whichever the request's prompt came in."""
    if isinstance(error, ContextLengthError):
        return bad_request(str(error), prompt_param, "context_length_exceeded")  # OpenAI's code for it
    if isinstance(error, KVCacheTooSmallError):
        return bad_request(str(error), "max_tokens", "kv_cache_too_small")
    if isinstance(error, (ValueError, TypeError, TokenizerMissingError)):
        # the sampling settings were checked before (schemas.py): what is left is the prompt's
        # (empty, token ids outside the vocabulary, a chat template that refused the messages)
        return bad_request(str(error), prompt_param)
    raise error  # not the request's fault: a 500, from the handler below


def install_error_handlers(app: FastAPI):
    """Give every error response the OpenAI shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        # FastAPI's 422 lists every problem; OpenAI answers 400 with one message and the parameter
        problem = error.errors()[0]
        location = [str(part) for part in problem["loc"] if part != "body"]
        if problem["type"] == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {problem['msg']}")
        if not location:  # the body as a whole: not an object, or not sent as JSON
            return error_response(400, f"the request body must be a JSON object, sent with Content-Type: "
                                       f"application/json ({problem['msg']})")
        where = ".".join(location)
        return error_response(400, f"{where}: {problem['msg']}", param=location[0])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(error.status_code, message, code=codes.get(error.status_code), headers=error.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        logger.exception("error while serving %s %s", request.method, request.url.path)
        return error_response(500, f"the server failed: {type(error).__name__}: {error}", type="server_error")
