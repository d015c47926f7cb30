"""The guard and the no-5xx promise on the real ``dora run dataflow-stream.yml``.

What a web page could send (a ``text/plain`` POST, a rebinding ``Host``, a
foreign ``Origin``) is refused by the real server, and a seeded batch of odd
requests over the wire (uvicorn + httptools in front, not ``ASGITransport``)
never gets a 5xx other than 503/504.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import httpx
import pytest

from tests.dataflow import Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BODY = {"messages": [{"role": "user", "content": "guarded words"}]}
REAL_FUZZ_REQUESTS = 150
SEED = 9


def test_what_a_web_page_could_send_is_refused(echo_flow: Dataflow) -> None:
    port = echo_flow.port
    with httpx.Client(base_url=echo_flow.base_url, timeout=30) as client:
        text_plain = client.post("/v1/chat/completions", content=json.dumps(BODY), headers={"content-type": "text/plain"})
        rebinding = client.post("/v1/chat/completions", json=BODY, headers={"host": f"attacker.example:{port}"})
        foreign = client.post("/v1/chat/completions", json=BODY, headers={"origin": "https://attacker.example"})
        null_origin = client.post("/v1/chat/completions", json=BODY, headers={"origin": "null"})
        same_origin = client.post("/v1/chat/completions", json=BODY, headers={"origin": echo_flow.base_url})
        localhost = client.get("/v1/models", headers={"host": f"localhost:{port}"})
        crlf_id = client.get("/v1/chat/completions/%0d%0a/stream")
        check_mark_id = client.post("/v1/chat/completions/%E2%9C%93/cancel")
    for r, status, param in [
        (text_plain, 415, "Content-Type"),
        (rebinding, 421, "Host"),
        (foreign, 403, "Origin"),
        (null_origin, 403, "Origin"),
        (crlf_id, 404, "id"),
        (check_mark_id, 404, "id"),
    ]:
        assert r.status_code == status, r.text
        assert r.json()["error"]["param"] == param
    assert same_origin.status_code == 200 and same_origin.json()["choices"][0]["message"]["content"] == "guarded words"
    assert localhost.status_code == 200


def _odd_request(rng: random.Random) -> tuple[str, str, list[tuple[bytes, bytes]], bytes | None]:
    """One request a hostile or broken client might send; only what an HTTP/1.1 client can put on the wire."""

    def text_bytes(n: int) -> bytes:  # visible ASCII and obs-text (0x80-0xff): what h11 lets through
        return bytes(rng.choice([*range(0x21, 0x7F), *range(0x80, 0x100)]) for _ in range(rng.randint(1, n)))

    def pick(good: list[bytes], odd: list[bytes]) -> bytes:
        roll = rng.random()
        return rng.choice(good) if roll < 0.6 else rng.choice(odd) if roll < 0.85 else text_bytes(24)

    method = rng.choice(["GET", "POST", "POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "BREW"])
    ident = rng.choice(
        [
            "chatcmpl-" + "".join(rng.choice("0123456789abcdef") for _ in range(rng.randint(1, 30))),
            "".join(f"%{b:02X}" for b in rng.randbytes(rng.randint(1, 12))),
            "%0d%0a",
            "%E2%9C%93",
            "%00",
            "chatcmpl-nope",
            "a" * 3000,
        ]
    )
    path = rng.choice(
        [
            "/v1/chat/completions",
            "/v1/chat/completions",
            f"/v1/chat/completions/{ident}",
            f"/v1/chat/completions/{ident}/stream",
            f"/v1/chat/completions/{ident}/cancel",
            f"/v1/models/{ident}",
            "/v1/models",
            "/",
            "/health",
            "/metrics",
            "/static/app.js",
            "/static/..%2f..%2fsettings.py",
            "/nope",
        ]
    )
    if rng.random() < 0.2:
        path += f"?{rng.choice(['starting_after', 'api_key', 'x'])}={ident}"
    headers: list[tuple[bytes, bytes]] = []
    options = {
        b"host": ([b"localhost", b"127.0.0.1"], [b"attacker.example", b"[::1", b"a:b:c", b"localhost:999999", b"\xff\xfe"]),
        b"origin": ([b"http://localhost"], [b"null", b"https://attacker.example", b"file://", b"\xe9"]),
        b"content-type": ([b"application/json", b"application/json; charset=utf-8"], [b"text/plain", b"\xe9", b"x/y"]),
        b"authorization": ([b"Bearer k"], [b"Bearer", b"Basic a2V5", b"\xff"]),
        b"last-event-id": ([b"0", b"2"], [b"-2", b"x", b"\xb2", b"9" * 30]),
        b"x-anything": ([b"1"], [b"\xff" * 10]),
    }
    for name, (good, odd) in options.items():
        if rng.random() < 0.4:
            headers.append((name, pick(good, odd)))
    words = " ".join(rng.choice(["alpha", "béta", "γ", "\u2028", "\\n"]) for _ in range(rng.randint(1, 4)))
    chat = {
        "messages": [{"role": rng.choice(["user", "system", "wizard"]), "content": words}],
        "stream": rng.random() < 0.5,
        "model": rng.choice(["m", "m\nINFO forged", "x" * 300, 5]),
    }
    if rng.random() < 0.2:
        chat["background"] = True
    if rng.random() < 0.2:
        chat["max_tokens"] = rng.choice([1, 0, -1, 2**63, "3"])
    body = rng.choice([None, json.dumps(chat).encode(), json.dumps(chat).encode(), rng.randbytes(rng.randint(0, 64)), b"{"])
    return method, path, headers, body


def test_odd_requests_to_the_real_server_never_get_a_5xx(echo_flow: Dataflow) -> None:
    rng = random.Random(SEED)
    tally: Counter[str] = Counter()
    failures: list[str] = []
    with httpx.Client(timeout=30) as client:
        for _ in range(REAL_FUZZ_REQUESTS):
            method, path, headers, body = _odd_request(rng)
            url = httpx.URL(echo_flow.base_url).copy_with(raw_path=path.encode("ascii"))
            tally["requests"] += 1
            try:
                r = client.request(method, url, headers=headers, content=body)
            except httpx.LocalProtocolError:
                tally["refused by the client library"] += 1
                continue
            except httpx.RemoteProtocolError:
                tally["closed without an answer"] += 1
                continue
            tally[str(r.status_code)] += 1
            if r.status_code >= 500 and r.status_code not in (503, 504):
                failures.append(f"{r.status_code} for {method} {path} {headers} {body!r:.200}: {r.text[:200]}")
            request_id = r.headers.get("x-request-id")
            if request_id is not None and not re.fullmatch(r"chatcmpl-[0-9a-f]+", request_id):
                failures.append(f"x-request-id {request_id!r} for {method} {path}")
        after = client.post(echo_flow.base_url + "/v1/chat/completions", json=BODY)
    statuses = sorted((k for k in tally if k.isdigit()), key=int)
    print(
        f"\nrequest fuzz on the real server: {tally['requests']} requests, {len(statuses)} distinct statuses: "
        + ", ".join(f"{k}x{tally[k]}" for k in statuses)
        + "".join(f"; {k}: {v}" for k, v in tally.items() if not k.isdigit() and k != "requests")
    )
    assert failures == []
    assert tally["closed without an answer"] == 0
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == "guarded words"
