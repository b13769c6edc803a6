"""Importing a service's heavy libraries while it waits for its first message."""

from __future__ import annotations

import importlib
import logging
import threading
import time

log = logging.getLogger("llamaduo.runtime.preload")


def preload(*modules: str) -> threading.Thread:
    """Import ``modules`` in a background thread, so that the first request does not pay for them (torch,
    transformers, peft and trl take seconds to import on a small CPU). Imports from several threads are safe
    (each module's import lock); a module that fails to import here fails again, with its error, where it is
    used."""

    def run() -> None:
        began = time.monotonic()
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as err:  # reported where it is really imported
                log.debug("preload of %s failed: %s", name, err)
        log.info("libraries preloaded", extra={"modules": list(modules), "seconds": round(time.monotonic() - began, 2)})

    thread = threading.Thread(target=run, name="llamaduo-preload", daemon=True)
    thread.start()
    return thread
