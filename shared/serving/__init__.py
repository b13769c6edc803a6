"""The OpenAI-compatible HTTP serving core shared by ``llamaduo serve`` and the inference service.

Serves one or more model folders (trained students or plain model folders) under the names a client passes as
``model``. Where things are:

* :mod:`~llamaduo.serving.api`: error bodies (``APIError``), the request body, its validation and messages;
* :mod:`~llamaduo.serving.engine`: a served model (``ServedModel``), request settings (``GenerationParams``,
  ``ModelDefaults``) and how one answer is generated and streamed;
* :mod:`~llamaduo.serving.registry`: the served models loaded from folders (``ModelRegistry``), LoRA students
  sharing their base;
* :mod:`~llamaduo.serving.app`: the Starlette app (``create_app``): routes, JSON answers and Server-Sent Events;
* :mod:`~llamaduo.serving.server`: running it (``serve``, ``serve_in_thread``, ``BackgroundServer``);
* :mod:`~llamaduo.serving.migration`: a finished migration's model and request defaults.
"""
