"""The contract kit's fault proxy, between a client and a small upstream app on loopback."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from gateway.testing.proxy import FaultProxy

POSTS = web.AppKey("posts", list)


def upstream_app() -> web.Application:
    app = web.Application()
    app[POSTS] = []

    async def echo(request: web.Request) -> web.Response:
        if request.method == "POST":
            request.app[POSTS].append(await request.text())
        link = request.url.with_query(page=2)  # how simulators build next-page links
        return web.json_response(
            {"method": request.method, "query": dict(request.query), "body": await request.text()},
            headers={"Link": f'<{link}>; rel="next"', "X-Upstream": "yes"},
        )

    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@pytest.fixture
async def proxied(loopback_server):
    upstream = upstream_app()
    proxy = FaultProxy(await loopback_server(upstream))
    base = await loopback_server(proxy.app)
    async with aiohttp.ClientSession() as session:
        yield upstream, proxy, base, session


async def test_requests_pass_through_unchanged_and_links_point_back_at_the_proxy(proxied):
    upstream, proxy, base, session = proxied
    async with session.post(f"{base}/api/items?x=1", data="hello", headers={"Authorization": "Basic abc"}) as response:
        body = await response.json()
        assert response.status == 200 and response.headers["X-Upstream"] == "yes"
        assert response.headers["Link"].startswith(f"<{base}/api/items?")
    assert body == {"method": "POST", "query": {"x": "1"}, "body": "hello"}
    (seen,) = proxy.seen
    assert (seen.method, seen.path, seen.status, seen.forwarded) == ("POST", "/api/items?x=1", 200, True)
    assert seen.credential is not None and "abc" not in seen.credential


async def test_planned_faults_are_answered_in_order_without_reaching_the_tool(proxied):
    upstream, proxy, base, session = proxied
    proxy.faults.throttle(1, retry_after=2).fail(1, status=502).drop(1)
    async with session.post(f"{base}/a", data="1") as first:
        assert first.status == 429 and first.headers["Retry-After"] == "2"
    async with session.post(f"{base}/a", data="2") as second:
        assert second.status == 502
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with session.post(f"{base}/a", data="3"):
            pass
    async with session.post(f"{base}/a", data="4") as fourth:
        assert fourth.status == 200
    assert upstream[POSTS] == ["4"]
    assert [s.status for s in proxy.seen] == [429, 502, None, 200]


async def test_g2_a_lost_answer_reaches_the_tool_but_never_the_client(proxied):
    upstream, proxy, base, session = proxied
    proxy.lose_responses(1, method="POST", path=r"/invoices$")
    async with session.get(f"{base}/invoices") as listed:
        assert listed.status == 200  # other methods are untouched
    async with session.post(f"{base}/invoices/query", data="q") as query:
        assert query.status == 200  # and other paths
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with session.post(f"{base}/invoices", data="create"):
            pass
    async with session.post(f"{base}/invoices", data="again") as again:
        assert again.status == 200
    assert upstream[POSTS] == ["q", "create", "again"]
    lost = [s for s in proxy.requests("POST") if s.forwarded and s.status is None]
    assert [s.path for s in lost] == ["/invoices"]


async def test_bearer_tokens_seen_before_expiry_are_refused_and_new_ones_pass(proxied):
    upstream, proxy, base, session = proxied
    old, new = {"Authorization": "Bearer old-token"}, {"Authorization": "Bearer new-token"}
    async with session.get(f"{base}/x", headers=old) as response:
        assert response.status == 200
    proxy.faults.expire_tokens()
    async with session.get(f"{base}/x", headers=old) as refused:
        assert refused.status == 401 and "invalid_token" in refused.headers["WWW-Authenticate"]
    async with session.get(f"{base}/x", headers=new) as renewed:
        assert renewed.status == 200
    async with session.get(f"{base}/x", headers={"Authorization": "Basic c3RhdGlj"}) as basic:
        assert basic.status == 200  # only bearer tokens expire
