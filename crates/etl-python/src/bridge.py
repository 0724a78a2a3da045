"""The Python half of etl-serve's Python bridge.

The Rust half (lib.rs) embeds CPython, runs `load` once from the plugin's
`init`, then `invoke` for each request. Everything a plugin sees is made by
the reference host's own package (`unstructured_platform_plugins`, 0.1.0),
imported from the plugin's virtualenv: the function it wraps, the schema it
generates, the input model it validates with, and how it classifies
failures. This module only calls it as etl-uvicorn's request handler does,
without FastAPI, and returns plain values for the Rust half to report.
"""

import asyncio
import concurrent.futures
import hashlib
import inspect
import json
import threading

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
from pydantic import TypeAdapter
from typing import Optional
from uvicorn.importer import import_from_string

_INJECTED = ["usage", "filedata_meta", "message_channels", "cancellation_token"]


# The status `_run` returns for a plugin that stopped on its token.
SHUTDOWN = 0


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
_USAGE = TypeAdapter(list[UsageData])


class _Plugin:
    """The wrapped function and what the reference derives from it."""

    def __init__(self, app, method_name, plugin_id, plugin_id_method, precheck_app, precheck_method):
        instance = import_from_string(app)
        self.func = get_func(instance, method_name)
        if inspect.isasyncgenfunction(self.func) or inspect.isgeneratorfunction(self.func):
            raise ValueError("streaming (generator) plugins are not served by the bridge yet")
        # The injected parameters are not inputs (cancellation_token too,
        # as etl-uvicorn's cooperative shutdown leaves it out of /schema).
        self.schema = get_schema_dict(self.func, omit=["usage", "cancellation_token"])
        if plugin_id:
            self.id = get_plugin_id(import_from_string(plugin_id), plugin_id_method)
        else:
            self.id = hashlib.sha256(
                json.dumps(self.schema, sort_keys=True).encode()
            ).hexdigest()[:32]
        self.input_model = schema_to_base_model(
            get_input_schema(self.func, omit=_INJECTED)
        )
        self.output = TypeAdapter(Optional[get_output_sig(self.func)])
        self.filedata_meta_model = _reference.update_filedata_model(get_output_sig(self.func))
        self.params = inspect.signature(self.func).parameters
        self.precheck = None
        if precheck_app:
            self.precheck = get_func(import_from_string(precheck_app), precheck_method)
        elif precheck_method:
            self.precheck = get_func(instance, precheck_method)


_plugin = None


def load(app, method_name, plugin_id, plugin_id_method, precheck_app, precheck_method):
    """Imports the plugin; returns (inputs schema, outputs schema, id) as JSON
    text and a string."""
    global _plugin
    _plugin = _Plugin(app, method_name, plugin_id, plugin_id_method, precheck_app, precheck_method)
    return (
        json.dumps(_plugin.schema["inputs"]),
        json.dumps(_plugin.schema["outputs"]),
        _plugin.id,
    )


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


def _call(func, kwargs, flag):
    """Calls the plugin's function: a sync one here, on the host's worker
    thread; an async one as a task of the shared event loop, which the
    worker waits for (without holding the GIL) and cancels, the asyncio
    way, as soon as the call's cancel flag is set."""
    if not inspect.iscoroutinefunction(func):
        return func(**kwargs)
    # The task runs in the loop's thread, in a copy of this thread's context
    # (run_coroutine_threadsafe schedules it with one), so the bound
    # invocation settings and context reach it.
    future = asyncio.run_coroutine_threadsafe(func(**kwargs), _event_loop())
    while not future.done():
        concurrent.futures.wait([future], timeout=_FLAG_POLL_SECONDS)
        if flag.is_set() and not future.done():
            future.cancel()
    return future.result()


def _stopped(exc, flag):
    """Whether `exc` ends the call as a shutdown: a `PluginShutdown` (ours,
    or any class of that name), or the cancellation of an async call whose
    flag was set."""
    if type(exc).__name__ == "PluginShutdown":
        return True
    cancelled = (concurrent.futures.CancelledError, asyncio.CancelledError)
    return isinstance(exc, cancelled) and flag.is_set()


def invoke(request_json, settings_json, context_json, flag):
    """Runs the plugin on one request (already validated by etl-serve, the
    reserved fields too), with the reserved fields bound as the reference
    binds them (`current_invocation_settings()`...).

    Returns (status, text, category, plugin_error, output, usage, infos,
    warnings, filedata_meta): status 200 with `output` as JSON text,
    SHUTDOWN, or a failure as the reference reports it (`plugin_error` a
    tuple or None). `flag` is the host's cancel flag for the call."""
    p = _plugin
    # etl-serve has applied the transport rules; what is left is resolving
    # (a sealed document is opened here, with the pod's key).
    try:
        settings = (
            resolve_invocation_settings(json.loads(settings_json)) if settings_json else None
        )
    except Exception as exc:
        # The reference answers this with a bare {"detail","reason"} body;
        # through the ABI it is a failure envelope with the same words.
        why = f"Unusable invocation settings: {type(exc).__name__}"
        return (http_status_for(exc), why, getattr(exc, "reason", None), None, None, [], [], [], "")
    context = (
        extract_context({"invocation_context": json.loads(context_json)}) if context_json else None
    )
    with invocation_envelope(settings, context):
        return _run(p.func, p, request_json, flag)


def precheck(flag):
    """Runs the precheck app, as `invoke` runs the function; the plain
    success when there is none."""
    p = _plugin
    if p.precheck is None:
        return (200, None, None, None, None, [], [], [], "")
    return _run(p.precheck, p, "", flag)


def _run(func, p, request_json, flag):
    params = inspect.signature(func).parameters
    usage = []
    message_channels = _reference.MessageChannels()
    filedata_meta = FileDataMeta()
    kwargs = {}
    if request_json:
        request = p.input_model.model_validate_json(request_json)
        kwargs = {f: getattr(request, f) for f in request.model_fields}
        file_data = kwargs.get("file_data")
        if file_data is not None:
            kwargs["file_data"] = _reference.file_data_from_dict(file_data.model_dump())
        map_inputs(func=p.func, raw_inputs=kwargs)
    if "usage" in params:
        kwargs["usage"] = usage
    if "message_channels" in params:
        kwargs["message_channels"] = message_channels
    if "filedata_meta" in params:
        kwargs["filedata_meta"] = filedata_meta
    if "cancellation_token" in params:
        kwargs["cancellation_token"] = CancellationToken(flag)

    def reported():
        meta = p.filedata_meta_model.model_validate(filedata_meta.model_dump())
        return (
            # As the reference's response model reads the list.
            [(u.name, str(u.value)) for u in _USAGE.validate_python(usage)],
            list(message_channels.infos),
            list(message_channels.warnings),
            meta.model_dump_json(),
        )

    try:
        output = _call(func, kwargs, flag)
    except BaseException as exc:
        if _stopped(exc, flag):
            return (SHUTDOWN, None, None, None, None) + reported()
        if not isinstance(exc, Exception):
            raise
        return _failure(exc) + reported()
    return (200, None, None, None, p.output.dump_json(output).decode()) + reported()


def _failure(exc):
    """How the reference reports `exc`: (status, text, category, plugin_error,
    output), by the branches of its request handler."""
    if isinstance(exc, _reference.HTTPException):
        text = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=_safe_str)
        return (exc.status_code, text, _reference.failure_category_of(exc), None, None)
    if isinstance(exc, _reference.UnstructuredIngestError):
        return (
            _reference.status_code_of(exc),
            _safe_str(exc),
            _reference.failure_category_of(exc),
            _plugin_error(exc),
            None,
        )
    return (
        _reference.status_code_of(exc),
        f"[{type(exc).__name__}] {_safe_str(exc)}",
        _reference.failure_category_of(exc),
        None,
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
