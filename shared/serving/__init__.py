"""The OpenAI-compatible HTTP serving core shared by ``llamaduo serve``, the inference service and the gateway.

Serves one or more model folders (trained students or plain model folders) under the names a client passes as
``model``. Where things are:

* :mod:`~llamaduo.serving.api`: error bodies (``APIError``, ``internal_error``: a 500 names an error id, never
  the exception), the request body, its validation and messages;
* :mod:`~llamaduo.serving.guard`: what stands in front of any OpenAI-compatible ASGI app: bearer API keys
  (``LLAMADUO_API_KEYS``, ``LLAMADUO_API_KEYS_FILE``, admin keys for the adapter endpoints), a body limit (413),
  a bounded queue of generations (429 + ``Retry-After``) and the ``max_tokens`` x ``n`` cap (400). All in
  ``ServingLimits`` (``ServingLimits.from_settings(settings)``). A server of its own (the gateway) wraps its app
  with ``guard_app(app, limits)``, or builds it as ``Starlette(..., middleware=guard_middleware(limits))`` to keep
  ``app.state``, and calls ``check_token_budget(max_tokens, n, limits)`` on each request;
* :mod:`~llamaduo.serving.engine`: a served model (``ServedModel``), request settings (``GenerationParams``,
  ``ModelDefaults``) and how one answer is generated, streamed and cancelled;
* :mod:`~llamaduo.serving.registry`: the served models loaded from folders (``ModelRegistry``), LoRA students
  sharing their base;
* :mod:`~llamaduo.serving.adapters`: LoRA adapters loaded and unloaded at run time (vLLM's
  ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``), from inside one folder only;
* :mod:`~llamaduo.serving.app`: the Starlette app (``create_app``): routes, JSON answers and Server-Sent Events;
* :mod:`~llamaduo.serving.server`: running it (``serve``, ``serve_in_thread``, ``BackgroundServer``);
* :mod:`~llamaduo.serving.migration`: a finished migration's model and request defaults.

This package and :mod:`~llamaduo.serving.guard` and :mod:`~llamaduo.serving.api` import no torch (the gateway
imports them); the model modules import it when they load or run a model.
"""
