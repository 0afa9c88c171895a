"""The PanDA server stand-in (vjobs.testing.panda_standin) on its own, without a pilot: it hands out its job once,
answers updates in the pilot 3.7 way (form-encoded) and the later pilots' way (gzip-compressed JSON), and tells a
pilot to kill a job the test marked."""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.parse
import urllib.request

from vjobs.testing.panda_standin import PandaStandin


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_standin_hands_out_its_job_once_and_records_updates():
    with PandaStandin({"PandaID": "7", "jobPars": "a b"}) as standin:
        calls = f"{standin.url}/server/panda"
        form = urllib.parse.urlencode({"siteName": "Q", "node": "n"}).encode()
        assert _post(f"{calls}/getJob", form) == (200, {"StatusCode": 0, "PandaID": "7", "jobPars": "a b"})
        assert _post(f"{calls}/getJob", form) == (200, {"StatusCode": 20})

        # the pilot 3.7 way: form-encoded, every value a string
        update = urllib.parse.urlencode({"jobId": "7", "state": "running"}).encode()
        assert _post(f"{calls}/updateJob", update)[1] == {"StatusCode": 0, "command": "NULL"}
        # the later pilots' way: gzip-compressed JSON
        standin.kill(7)
        body = gzip.compress(json.dumps({"jobId": 7, "state": "failed", "pilotErrorCode": 1144}).encode())
        reply = _post(f"{calls}/updateJob", body, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert reply[1] == {"StatusCode": 0, "command": "tobekilled"}

        assert _post(f"{calls}/noSuchCall", b"")[0] == 404
        assert standin.states(7) == ["running", "failed"]
        assert standin.final(7)["pilotErrorCode"] == 1144
        assert standin.calls() == ["getJob", "getJob", "updateJob", "updateJob", "noSuchCall"]
