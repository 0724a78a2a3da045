"""The Python half of etl-serve's Python bridge.

The Rust half (lib.rs) embeds CPython, runs `load` once from the plugin's
`init`, then `invoke` (or `stream`, for a generator function) for each
request. Everything a plugin sees is made by the reference host's own
package (`unstructured_platform_plugins`, 0.1.0), imported from the
plugin's virtualenv: the function it wraps, the schema it generates, the
input model it validates with, the envelope model its answers go through,
and how it classifies failures. This module only calls it as etl-uvicorn's
request handler does, without FastAPI, and returns plain values for the
Rust half to report.

What `invoke`, `stream` and `precheck` return (an "answer"):
(status, text, category, plugin_error, output, usage, infos, warnings,
filedata_meta, file_data): status 200 with `output` as JSON text (or None),
SHUTDOWN, REJECTED (the request does not fit the reference's input model:
`text` is the 422's body), or a failure as the reference reports it
(`plugin_error` a tuple or None). `usage`, `infos` and `warnings` are what the host has not been
told yet; `filedata_meta` and `file_data` are JSON text to set, or "" to
leave as they are.
"""

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import importlib
import inspect
import json
import sys
import threading
import types

from unstructured_platform_plugins.etl_uvicorn import api_generator as _reference
from unstructured_platform_plugins.etl_uvicorn.utils import (
    get_func,
    get_input_schema,
    get_output_sig,
    get_plugin_id,
    get_schema_dict,
    map_inputs,
)
from unstructured_platform_plugins.invocation_context import extract_context
from unstructured_platform_plugins.invocation_settings import http_status_for, invocation_envelope
from unstructured_platform_plugins.schema import FileDataMeta, UsageData
from utic_invocation_settings import resolve_invocation_settings
from unstructured_platform_plugins.schema.json_schema import schema_to_base_model
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError, create_model
from unstructured_platform_plugins.type_hints import get_type_hints as _type_hints
from typing import Optional
from uvicorn.importer import import_from_string

_INJECTED = ["usage", "filedata_meta", "message_channels", "cancellation_token"]


# The status of an answer for a plugin that stopped on its token.
SHUTDOWN = 0

# The status of an answer refusing the request: its text is the body of the
# 422 to answer instead of an envelope.
REJECTED = 1


class _Refused(Exception):
    """The request does not fit the reference's input model (which etl-serve's
    own check let through): `body` is FastAPI's 422 for it."""

    def __init__(self, body):
        super().__init__(body)
        self.body = body


def _fastapi_422(exc):
    """The body FastAPI answers when the reference's route validates the
    request body and pydantic raises `exc`, written by the same response
    class FastAPI's handler uses."""
    errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
    return JSONResponse({"detail": jsonable_encoder(errors)}).body.decode()


class PluginShutdown(Exception):
    """Raised by `cancellation_token.raise_if_cancelled()`: the plugin stopped
    because the server is shutting down (or its client went away). The
    caller gets the retryable 503 shutdown-abort. An exception of this name
    from elsewhere (the reference's own, where it has one) counts the same."""


class CancellationToken:
    """Injected as the `cancellation_token` parameter, as in etl-uvicorn's
    cooperative shutdown: read-only, backed by the host's cancel flag for
    this invocation."""

    def __init__(self, flag):
        self._flag = flag

    def is_cancelled(self):
        return self._flag.is_set()

    def raise_if_cancelled(self):
        if self._flag.is_set():
            raise PluginShutdown("the server is shutting down")


# Where etl-uvicorn's cooperative shutdown (after 0.1.0) puts its token and
# exception, beside its server; a plugin written against it imports them
# from there.
SHUTDOWN_MODULE = "unstructured_platform_plugins.etl_uvicorn.shutdown"


def _provide_shutdown_module():
    """Makes `PluginShutdown` and `CancellationToken` importable from
    SHUTDOWN_MODULE when the installed reference has no such module (0.1.0
    has none), so that a plugin written against etl-uvicorn's cooperative
    shutdown imports them unchanged. A reference that has it keeps its own:
    its PluginShutdown counts by name."""
    try:
        importlib.import_module(SHUTDOWN_MODULE)
        return
    except ImportError:
        pass
    module = types.ModuleType(SHUTDOWN_MODULE, "Provided by etl-serve's Python bridge.")
    module.PluginShutdown = PluginShutdown
    module.CancellationToken = CancellationToken
    sys.modules[SHUTDOWN_MODULE] = module
    package, _, name = SHUTDOWN_MODULE.rpartition(".")
    setattr(importlib.import_module(package), name, module)


def _response_model(response_type, meta_model):
    """The model of the envelope, with the fields and types the reference's
    request handler gives its own: what it validates (an output that does
    not fit its type fails here as it fails there) and how it writes each
    field are the reference's."""
    return create_model(
        "InvokeResponse",
        usage=(list[UsageData], ...),
        status_code=(int, ...),
        file_data=(Optional[_reference.FileDataType], None),
        filedata_meta=(Optional[meta_model], None),
        status_code_text=(Optional[str], None),
        failure_category=(Optional[str], None),
        plugin_error=(Optional[_reference.PluginErrorMetadata], None),
        output=(Optional[response_type], None),
        message_channels=(_reference.MessageChannels, Field(default_factory=_reference.MessageChannels)),
    )


class _Plugin:
    """The wrapped function and what the reference derives from it."""

    def __init__(self, app, method_name, plugin_id, plugin_id_method, precheck_app, precheck_method):
        instance = import_from_string(app)
        self.func = get_func(instance, method_name)
        self.streams = inspect.isasyncgenfunction(self.func) or inspect.isgeneratorfunction(self.func)
        # The injected parameters are not inputs (cancellation_token too,
        # as etl-uvicorn's cooperative shutdown leaves it out of /schema).
        self.schema = get_schema_dict(self.func, omit=["usage", "cancellation_token"])
        if plugin_id:
            self.id = get_plugin_id(import_from_string(plugin_id), plugin_id_method)
        else:
            self.id = hashlib.sha256(
                json.dumps(self.schema, sort_keys=True).encode()
            ).hexdigest()[:32]
        # What a request may carry: the reference publishes the injected
        # message_channels and filedata_meta in /schema, but its input model
        # leaves them out.
        self.request_schema = get_input_schema(self.func, omit=_INJECTED)
        self.input_model = schema_to_base_model(self.request_schema)
        response_type = get_output_sig(self.func)
        self.meta_model = _reference.update_filedata_model(response_type)
        self.default_meta = self.meta_model()
        self.Response = _response_model(response_type, self.meta_model)
        self.precheck = None
        if precheck_app:
            self.precheck = get_func(import_from_string(precheck_app), precheck_method)
        elif precheck_method:
            self.precheck = get_func(instance, precheck_method)
        # Looked up once: inspecting a signature costs more than the rest of
        # a small call.
        self.params = {f: inspect.signature(f).parameters for f in (self.func, self.precheck) if f}
        self.is_async = {f: inspect.iscoroutinefunction(f) for f in self.params}
        self.maps_inputs = _map_inputs_can_act(self.func)


def _map_inputs_can_act(func):
    """Whether the reference's `map_inputs` can do anything observable for
    `func`. Its handler calls it and drops the result, so what remains is
    the exception it raises when a parameter typed as a dataclass or a
    pydantic model cannot be built; for a function without such a
    parameter it does nothing, and the bridge skips it."""
    try:
        hints = _type_hints(func)
    except Exception:
        return True
    hints.pop("return", None)
    return any(
        dataclasses.is_dataclass(t) or (inspect.isclass(t) and issubclass(t, BaseModel))
        for t in hints.values()
    )


_plugin = None


# Python's recursion limit while the bridge runs. The host hands over
# values nested up to 1000 levels, its limit on a body; json.loads recurses
# once per level, and the default limit of 1000 frames, less the bridge's
# own, stops it near 990.
_RECURSION_LIMIT = 1100


def load(app, method_name, plugin_id, plugin_id_method, precheck_app, precheck_method):
    """Imports the plugin; returns its inputs and outputs schemas as JSON
    text, its id, whether it streams, and the schema of what a request may
    carry as JSON text."""
    global _plugin
    # Before the import, so that a plugin that sets a limit of its own keeps it.
    if sys.getrecursionlimit() < _RECURSION_LIMIT:
        sys.setrecursionlimit(_RECURSION_LIMIT)
    _provide_shutdown_module()
    _plugin = _Plugin(app, method_name, plugin_id, plugin_id_method, precheck_app, precheck_method)
    return (
        json.dumps(_plugin.schema["inputs"]),
        json.dumps(_plugin.schema["outputs"]),
        _plugin.id,
        _plugin.streams,
        json.dumps(_plugin.request_schema),
    )


# ---- calling the function ------------------------------------------------

_loop = None
_loop_lock = threading.Lock()


def _event_loop():
    """The one event loop every async plugin call runs on, in a thread of
    its own, started on first use."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="etl-serve-asyncio", daemon=True).start()
            _loop = loop
        return _loop


# How often a worker waiting for an async call looks at the cancel flag.
_FLAG_POLL_SECONDS = 0.02


def _on_loop(coroutine, flag):
    """Runs `coroutine` as a task of the shared event loop and waits for it
    (without holding the GIL), cancelling the task, the asyncio way, as
    soon as the call's cancel flag is set, and waiting on until it has
    unwound: its `CancelledError` handlers have run when the caller gets
    its answer. (A task that swallows the cancellation runs on; the graceful
    deadline then answers its caller, as for any call.) The task runs in a
    copy of this thread's context (run_coroutine_threadsafe schedules it
    with one), so the bound invocation settings and context reach it."""
    loop = _event_loop()
    task = []

    async def tracked():
        task.append(asyncio.current_task())
        return await coroutine

    future = asyncio.run_coroutine_threadsafe(tracked(), loop)
    cancelled = False
    while not future.done():
        concurrent.futures.wait([future], timeout=_FLAG_POLL_SECONDS)
        if flag.is_set() and task and not cancelled:
            loop.call_soon_threadsafe(task[0].cancel)
            cancelled = True
    return future.result()


def _call(func, kwargs, flag):
    """Calls a plain (not generator) function: a sync one here, on the
    host's worker thread, an async one on the shared loop."""
    if _plugin.is_async[func]:
        return _on_loop(func(**kwargs), flag)
    return func(**kwargs)


_END = object()


def _items(func, kwargs, flag):
    """The items of a generator function, sync or async, as a sync
    iterator; an async generator's steps run on the shared loop."""
    if not inspect.isasyncgenfunction(func):
        yield from func(**kwargs)
        return
    agen = func(**kwargs)

    async def step():
        try:
            return await agen.__anext__()
        except StopAsyncIteration:
            return _END

    try:
        while (item := _on_loop(step(), flag)) is not _END:
            yield item
    finally:
        # Closes it on the loop when it did not end by itself (the client
        # went away); bounded, in case the plugin's cleanup hangs.
        closing = asyncio.run_coroutine_threadsafe(agen.aclose(), _event_loop())
        try:
            closing.result(timeout=1)
        except BaseException:
            pass


def _stopped(exc, flag):
    """Whether `exc` ends the call as a shutdown: a `PluginShutdown` (ours,
    or any class of that name), or the cancellation of an async call whose
    flag was set."""
    if type(exc).__name__ == "PluginShutdown":
        return True
    cancelled = (concurrent.futures.CancelledError, asyncio.CancelledError)
    return isinstance(exc, cancelled) and flag.is_set()


# ---- one call ---------------------------------------------------------------


class _Call:
    """One call's injected values and inputs, and what the host has been
    told of them so far."""

    def __init__(self, p, func, request_json, flag):
        self.p = p
        self.usage = []
        self.message_channels = _reference.MessageChannels()
        self.filedata_meta = FileDataMeta()
        self.kwargs = {}
        # The host hands "null" to a function without parameters.
        if request_json and request_json != "null":
            try:
                request = p.input_model.model_validate_json(request_json)
            except ValidationError:
                # As the reference's route validates the parsed body, for
                # its errors (parsing the JSON in pydantic first is faster,
                # and nearly every request passes).
                try:
                    request = p.input_model.model_validate(
                        json.loads(request_json), from_attributes=True
                    )
                except ValidationError as exc:
                    raise _Refused(_fastapi_422(exc)) from None
            self.kwargs = {f: getattr(request, f) for f in type(request).model_fields}
            file_data = self.kwargs.get("file_data")
            if file_data is not None:
                self.kwargs["file_data"] = _reference.file_data_from_dict(file_data.model_dump())
            if p.maps_inputs:
                map_inputs(func=p.func, raw_inputs=self.kwargs)
        params = p.params[func]
        if "usage" in params:
            self.kwargs["usage"] = self.usage
        if "message_channels" in params:
            self.kwargs["message_channels"] = self.message_channels
        if "filedata_meta" in params:
            self.kwargs["filedata_meta"] = self.filedata_meta
        if "cancellation_token" in params:
            self.kwargs["cancellation_token"] = CancellationToken(flag)
        self.told = {"usage": 0, "infos": 0, "warnings": 0, "meta": _DEFAULT_META, "file_data": "null"}

    def envelope(self, **fields):
        """The reference's envelope for this call with `fields` (status_code,
        output...): the usage, messages, filedata_meta and file_data the
        function left, validated as the reference validates them."""
        meta = self.filedata_meta
        untouched = meta.terminate_current is False and not meta.new_records
        return self.p.Response(
            usage=self.usage,
            message_channels=self.message_channels,
            filedata_meta=(
                self.p.default_meta
                if untouched and type(meta) is FileDataMeta
                else self.p.meta_model.model_validate(meta.model_dump())
            ),
            file_data=self.kwargs.get("file_data"),
            **fields,
        )

    def news(self, envelope):
        """What `envelope` holds that the host was not told yet: (usage,
        infos, warnings, filedata_meta, file_data), as an answer carries
        them."""
        usage = [(u.name, str(u.value)) for u in envelope.usage[self.told["usage"]:]]
        infos = list(envelope.message_channels.infos[self.told["infos"]:])
        warnings = list(envelope.message_channels.warnings[self.told["warnings"]:])
        self.told["usage"] += len(usage)
        self.told["infos"] += len(infos)
        self.told["warnings"] += len(warnings)
        return (usage, infos, warnings, self._changed("meta", envelope, "filedata_meta"),
                self._changed("file_data", envelope, "file_data"))

    def _changed(self, key, envelope, field):
        if getattr(envelope, field) is None and self.told[key] == "null":
            return ""
        if field == "filedata_meta" and _is_default_meta(envelope.filedata_meta):
            text = _DEFAULT_META
        else:
            text = _field_json(envelope, field)
        if text == self.told[key]:
            return ""
        self.told[key] = text
        return text


_DEFAULT_META = '{"terminate_current":false,"new_records":[]}'


def _is_default_meta(meta):
    """Whether `meta` writes as _DEFAULT_META (checked without writing it)."""
    return (
        meta is not None
        and meta.terminate_current is False
        and not meta.new_records
        and type(meta).model_fields.keys() == {"terminate_current", "new_records"}
    )


def _field_json(model, field):
    """One field of `model` as JSON text, written as the whole model writes
    it."""
    whole = model.model_dump_json(include={field})
    return whole[len(field) + 4:-1]


def _bound(settings_json, context_json):
    """The reserved fields, resolved as the reference resolves them (a
    sealed document is opened here, with the pod's key): (settings,
    context), or a failure answer."""
    try:
        settings = (
            resolve_invocation_settings(json.loads(settings_json)) if settings_json else None
        )
    except Exception as exc:
        # The reference answers this with a bare {"detail","reason"} body;
        # through the ABI it is a failure envelope with the same words.
        why = f"Unusable invocation settings: {type(exc).__name__}"
        return None, (http_status_for(exc), why, getattr(exc, "reason", None), None, None, [], [], [], "", "")
    context = (
        extract_context({"invocation_context": json.loads(context_json)}) if context_json else None
    )
    return (settings, context), None


def invoke(request_json, settings_json, context_json, flag):
    """Runs the plugin on one request (already validated by etl-serve, the
    reserved fields too), with the reserved fields bound as the reference
    binds them (`current_invocation_settings()`...). `flag` is the host's
    cancel flag for the call."""
    bound, failed = _bound(settings_json, context_json)
    if failed:
        return failed
    with invocation_envelope(*bound):
        return _run(_plugin.func, request_json, flag)


def precheck(flag):
    """Runs the precheck app, as `invoke` runs the function; the plain
    success when there is none."""
    if _plugin.precheck is None:
        return (200, None, None, None, None, [], [], [], "", "")
    return _run(_plugin.precheck, "", flag)


def _refusal(refused):
    return (REJECTED, refused.body, None, None, None, [], [], [], "", "")


def _run(func, request_json, flag):
    try:
        call = _Call(_plugin, func, request_json, flag)
    except _Refused as refused:
        return _refusal(refused)
    try:
        output = _call(func, call.kwargs, flag)
        envelope = call.envelope(status_code=200, output=output)
        # Written here, so that an output pydantic cannot serialize is a
        # failure as the reference reports it in a stream.
        output_json = _field_json(envelope, "output")
    except BaseException as exc:
        if _stopped(exc, flag):
            return (SHUTDOWN, None, None, None, None) + call.news(call.envelope(status_code=503))
        if not isinstance(exc, Exception):
            raise
        status, text, category, plugin_error = _failure(exc)
        return (status, text, category, plugin_error, None) + call.news(
            call.envelope(status_code=status)
        )
    return (200, None, None, None, output_json) + call.news(envelope)


def stream(request_json, settings_json, context_json, flag, sink):
    """Runs a generator function on one request, as `invoke` runs a plain
    one, handing each item to `sink.item(usage, infos, warnings,
    filedata_meta, file_data, output)` (what is new since the last item, as
    in an answer, and the item's JSON), which returns False once the client
    is gone. Returns how it ended."""
    bound, failed = _bound(settings_json, context_json)
    if failed:
        return failed
    with invocation_envelope(*bound):
        return _stream(_plugin.func, request_json, flag, sink)


def _stream(func, request_json, flag, sink):
    try:
        call = _Call(_plugin, func, request_json, flag)
    except _Refused as refused:
        return _refusal(refused)
    items = _items(func, call.kwargs, flag)
    try:
        for item in items:
            envelope = call.envelope(status_code=200, output=item)
            if not sink.item(*call.news(envelope), _field_json(envelope, "output")):
                # The client went away: stop the generator where it is.
                items.close()
                return (SHUTDOWN, None, None, None, None, [], [], [], "", "")
    except BaseException as exc:
        if _stopped(exc, flag):
            return (SHUTDOWN, None, None, None, None) + call.news(call.envelope(status_code=503))
        if not isinstance(exc, Exception):
            raise
        # The reference's failure line: every exception as "[Type] message",
        # and no file_data.
        status = _reference.status_code_of(exc)
        failure = (
            status,
            f"[{type(exc).__name__}] {_safe_str(exc)}",
            _reference.failure_category_of(exc),
            _plugin_error(exc),
            None,
        )
        news = call.news(call.envelope(status_code=status))
        return failure + news[:4] + ("null" if call.told["file_data"] != "null" else "",)
    return (200, None, None, None, None) + call.news(call.envelope(status_code=200))


def _failure(exc):
    """How the reference reports `exc`: (status, text, category,
    plugin_error), by the branches of its request handler."""
    if isinstance(exc, _reference.HTTPException):
        text = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=_safe_str)
        return (exc.status_code, text, _reference.failure_category_of(exc), None)
    if isinstance(exc, _reference.UnstructuredIngestError):
        return (
            _reference.status_code_of(exc),
            _safe_str(exc),
            _reference.failure_category_of(exc),
            _plugin_error(exc),
        )
    return (
        _reference.status_code_of(exc),
        f"[{type(exc).__name__}] {_safe_str(exc)}",
        _reference.failure_category_of(exc),
        None,
    )


def _safe_str(value):
    try:
        return str(value)
    except Exception:
        return "<unrenderable error>"


def _plugin_error(exc):
    e = _reference.plugin_error_of(exc)
    if e is None:
        return None
    audience = e.audience.value if e.audience is not None else None
    return (e.error_type, e.error_reason, e.dependency, audience, e.retryable)
