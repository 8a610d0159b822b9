"""The API's HTTP server: gunicorn's gevent worker, so a waiting client costs a socket, not a thread.

gunicorn monkey-patches the standard library (sockets, threads, locks, queues, time.sleep) in each
gevent worker process first thing, before it imports the app; Flask, redis-py, kombu (Celery's
publishing) and the job events fan-out (tasks/store/followers.py) then cooperate without knowing it:
the fan-out's dispatcher thread is a greenlet. `genqueue api` runs gunicorn with this worker.

A client's deadlines, so a slow or hostile one holds nothing but its own socket, and not for long:
- its request head (request line and headers) must arrive within HEADER_TIMEOUT_S: gunicorn's gevent
  worker bounds each head's read by its keep-alive setting, which `genqueue api` sets to it (so an idle
  keep-alive connection is closed after it too);
- each read of its body, and each write of the answer, may wait at most BODY_TIMEOUT_S for the client
  (the socket's timeout, set here): a body that stops arriving is a 408, a reader that stops reading
  is dropped.
"""

from __future__ import annotations

from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

import config


class Worker(GeventWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.io_timeout_s = float(config.load()["BODY_TIMEOUT_S"])

    def handle(self, listener, client, addr):
        client.settimeout(self.io_timeout_s)  # where GeventWorker makes the socket block without limit
        AsyncWorker.handle(self, listener, client, addr)


WORKER_CLASS = f"{__name__}.{Worker.__name__}"
