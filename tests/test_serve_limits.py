"""`serve.py` body limit: a client sending more than `max_body_bytes` reads the 413 and its reason, whether the
body declares its length or is chunked, instead of a connection reset while it is still sending."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.test_serve import Served, server, tiny_classifier  # noqa: F401 (module fixtures: max_body_bytes=65536)

BIG = json.dumps({"text": "a" * (1 << 20)}).encode()  # 1 MiB, 16x the fixture's limit


def refusal(body: bytes) -> dict:
    answer = json.loads(body)
    assert "max_body_bytes=65,536" in answer["error"], answer
    return answer


def test_a_declared_body_over_the_limit_is_read_back_as_413(server: Served) -> None:  # noqa: F811
    request = urllib.request.Request(f"{server.url}/predict", data=BIG, method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:  # a URLError or ConnectionResetError is the bug
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 413
    assert f"{len(BIG):,} bytes" in refusal(info.value.read())["error"]
    assert server.post({"text": "still serving"})[0] == 200


def test_a_chunked_body_over_the_limit_is_read_back_as_413(server: Served) -> None:  # noqa: F811
    url = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        chunks = (BIG[i:i + 8192] for i in range(0, len(BIG), 8192))
        conn.request("POST", "/predict", body=chunks, headers={"Content-Type": "application/json"},
                     encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413
        refusal(response.read())
    finally:
        conn.close()
    assert server.post({"text": "still serving"})[0] == 200
