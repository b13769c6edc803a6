"""LlamaDuo: migrate a task from a service LLM to a small local model, automatically.

Where an import path lives (the repository keeps the layout the project was given; the package maps it):

* ``llamaduo.X.Y`` is ``shared/X/Y.py`` (``llamaduo.bus.broker`` is ``shared/bus/broker.py``);
* ``llamaduo.services.S.M`` is ``services/S/M.py`` (``llamaduo.services.judge.app`` is ``services/judge/app.py``).

The rooms of ``shared/``, by concern: ``contracts`` (events, spec, migration state, published docs), ``bus``
(broker, connection and auth, client), ``storage`` (artifact store, every key), ``data`` (rows, datasets,
embeddings, text and scoring), ``providers`` (service LLMs, limits, budget, re-asks), ``models`` (the
student's base models: resolve, tiny, loading, generation), ``serving`` (the OpenAI-compatible server),
``runtime`` (a service process, the embedded installation, local servers, logs), ``reporting`` (manifest,
HTML report, charts, live progress), ``cli`` (the ``llamaduo`` command), ``tasks`` (oracles, user code, the
shipped tasks). ``errors`` and ``settings`` are the project-wide exception base and config loader.

Services import ``llamaduo.*`` but never each other; nothing in ``shared/`` imports a service (the runtime
finds them through the ``llamaduo.services`` entry points).
"""

__version__ = "0.1.0"
