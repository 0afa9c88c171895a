"""A PanDA server stand-in for tests: NOT a PanDA server, only the few calls that PanDA Pilot 3 makes while it
runs one job, answered minimally, on loopback.

What it implements (observed with panda-pilot 3.7.0.36, generic workflow, see ``pilot/util/https.py`` and
``pilot/control/job.py``):

- ``POST /server/panda/getJob``: hands out the job it was given, once (``StatusCode: 0`` plus the job's
  fields); afterwards "no jobs" (``StatusCode: 20``, the server's SC_NoJobs; the pilot would sleep 60 s and
  ask again, but with queue data ``timefloor: 0`` it does not ask after its first job).
- ``POST /server/panda/updateJob``: records every update in order (``state`` and all other fields exactly as
  sent: ``pilotErrorCode``, ``pilotErrorDiag``, ``transExitCode``, ``exeErrorCode``, ``exeErrorDiag`` and, in
  final updates, ``xml``: a JSON string of the staged-out files with their ``surl``, ``fsize``,
  ``adler32``) and answers ``StatusCode: 0`` with ``command: NULL``, or ``command: tobekilled`` for a job
  that ``kill()`` was called on (the pilot then SIGTERMs the payload and reports ``failed``, error 1144).
- ``POST /server/panda/updateWorkerPilotStatus`` (sent only when HARVESTER_ID and HARVESTER_WORKER_ID are
  set), ``getStatus``, ``getProxy``, ``getKeyPair``: recorded and answered with ``StatusCode: 0`` and nothing
  else. This pilot version does not call them in the runs tested here.

Where it guesses: the real server's replies carry more fields (``pilotSecrets``, ``Status``...), the pilot
does not need them. Bodies are decoded from either encoding the pilot family uses: 3.7.0.36 posts
``application/x-www-form-urlencoded`` through ``curl --config`` (every value a string, dicts as their
Python ``str()``); later pilots post gzip-compressed JSON. Any other path gets 404 and is recorded too.

Plain HTTP: the pilot takes the scheme from ``--url http://127.0.0.1`` and runs ``curl``, which ignores its
empty ``--cert/--key/--capath`` options for ``http://``. Loopback only; no authentication is checked.
"""

from __future__ import annotations

import gzip
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFIX = "/server/panda/"
NO_JOBS = 20  # PanDA's StatusCode for "no job available"
MINIMAL_CALLS = ("updateWorkerPilotStatus", "getStatus", "getProxy", "getKeyPair")


class PandaStandin:
    """The stand-in on 127.0.0.1 and a free port. ``job`` (a PanDA job dict, ``PandaID`` at least) is handed
    out by the first getJob; ``add_job()`` queues more. Use as a context manager, or ``start()``/``stop()``."""

    def __init__(self, job: dict | None = None):
        self._lock = threading.Lock()
        self._jobs: list[dict] = [dict(job)] if job else []
        self._kill: set[str] = set()
        self.requests: list[tuple[str, dict]] = []  # (call name, decoded body) of every request, in order
        self.updates: list[dict] = []  # the bodies of the updateJob calls, in order
        self.httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- what tests use -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_job(self, job: dict) -> None:
        with self._lock:
            self._jobs.append(dict(job))

    def kill(self, job_id) -> None:
        """Answer every later updateJob of this job with ``command: tobekilled``."""
        with self._lock:
            self._kill.add(str(job_id))

    def states(self, job_id) -> list[str]:
        """The states the pilot reported for this job, in order (``running`` repeats as heartbeats)."""
        with self._lock:
            return [u.get("state") for u in self.updates if str(u.get("jobId")) == str(job_id)]

    def final(self, job_id) -> dict | None:
        """The last update of this job in a final state (finished, failed, holding), or None."""
        with self._lock:
            done = [u for u in self.updates
                    if str(u.get("jobId")) == str(job_id) and u.get("state") in ("finished", "failed", "holding")]
        return done[-1] if done else None

    def calls(self) -> list[str]:
        """The names of the calls received, in order."""
        with self._lock:
            return [name for name, _ in self.requests]

    # --- life cycle -----------------------------------------------------------------------------------

    def start(self) -> "PandaStandin":
        handler = type("Handler", (_Handler,), {"standin": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="panda-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def __enter__(self) -> "PandaStandin":
        return self.start() if self.httpd is None else self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # --- the calls ------------------------------------------------------------------------------------

    def answer(self, name: str, body: dict) -> dict | None:
        """The reply to one call, or None for an unknown one (404)."""
        with self._lock:
            self.requests.append((name, body))
            if name == "getJob":
                return {"StatusCode": 0, **self._jobs.pop(0)} if self._jobs else {"StatusCode": NO_JOBS}
            if name == "updateJob":
                self.updates.append(body)
                command = "tobekilled" if str(body.get("jobId")) in self._kill else "NULL"
                return {"StatusCode": 0, "command": command}
            if name in MINIMAL_CALLS:
                return {"StatusCode": 0}
        return None


class _Handler(BaseHTTPRequestHandler):
    standin: PandaStandin
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 (http.server's naming)
        name = self.path.split("?", 1)[0].removeprefix(PREFIX) if self.path.startswith(PREFIX) else self.path
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        reply = self.standin.answer(name, decode_body(raw, self.headers))
        if reply is None:
            self._send(404, {"error": f"not served by the stand-in: {self.path}"})
        else:
            self._send(200, reply)

    do_GET = do_POST  # curl without data would GET; answer the same way

    def _send(self, status: int, document: dict) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep test output quiet; requests are recorded instead
        pass


def decode_body(raw: bytes, headers) -> dict:
    """A request body as a dict: gzip-compressed or plain, JSON or form-encoded (what pilots send)."""
    if headers.get("Content-Encoding", "").lower() == "gzip" or raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8", "replace")
    if "json" in headers.get("Content-Type", "").lower() or text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except ValueError:
            pass
        else:
            return document if isinstance(document, dict) else {"": document}
    return dict(urllib.parse.parse_qsl(text, keep_blank_values=True))
