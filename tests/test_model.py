"""The BalancerPool model: durations, parsing into dataclasses, validation errors, the check CLI."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancerpool.proxy.cli import main as cli_main
from balancerpool.proxy.model import (
    API_VERSION,
    KIND,
    BalancerPool,
    ConnectionPoolSpec,
    FieldError,
    InvalidBalancerPool,
    LBMethod,
    MemberSpec,
    RouteSpec,
    StickySession,
    parse_duration,
    parse_pool,
    parse_pools,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ---------------------------------------------------------------------------------------------
# Helpers


def pool_doc(members: list[Any] | None = None, name: str = "web", **spec: Any) -> dict[str, Any]:
    """A valid BalancerPool document; keyword arguments replace or add spec fields."""
    if members is None:
        members = [{"url": "http://10.0.0.1:8080", "name": "a"}]
    body: dict[str, Any] = {"routes": [{"path": "/"}], "members": members}
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": body}


def parse_one(doc: dict[str, Any]) -> BalancerPool:
    pools = parse_pools(yaml.safe_dump(doc, sort_keys=False))
    assert len(pools) == 1
    return pools[0]


def errors_of_text(text: str) -> list[str]:
    with pytest.raises(InvalidBalancerPool) as info:
        parse_pools(text)
    # The exception message is every error, one a line.
    assert str(info.value) == "\n".join(str(e) for e in info.value.errors)
    return [str(e) for e in info.value.errors]


def errors_of(doc: object) -> list[str]:
    return errors_of_text(yaml.safe_dump(doc, sort_keys=False))


def member_errors(**fields: Any) -> list[str]:
    """The errors for a pool whose only member has ``fields`` on top of a valid url and name."""
    return errors_of(pool_doc([{"url": "http://10.0.0.1:8080", "name": "a", **fields}]))


def spec_errors(**fields: Any) -> list[str]:
    return errors_of(pool_doc(**fields))


HEADER = f"apiVersion: {API_VERSION}\nkind: {KIND}\n"
DNS_LABEL = "must be a DNS label (lower-case letters, digits, '-'), got"


# ---------------------------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5s", 5.0),
        ("200ms", 0.2),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1h1m1s", 3661.0),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("1s500ms", 1.5),
        (" 5s ", 5.0),
        (5, 5.0),
        (0, 0.0),
        (2.5, 2.5),
        (0.25, 0.25),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    result = parse_duration(value)
    assert type(result) is float
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "must be a non-negative duration, got -1"),
        (-0.5, "must be a non-negative duration, got -0.5"),
        (math.inf, "must be a non-negative duration, got inf"),
        (math.nan, "must be a non-negative duration, got nan"),
        ("-5s", "must be a duration like 5s, 200ms or 1m, got '-5s'"),
        ("soon", "must be a duration like 5s, 200ms or 1m, got 'soon'"),
        ("", "must be a duration like 5s, 200ms or 1m, got ''"),
        ("5x", "must be a duration like 5s, 200ms or 1m, got '5x'"),
        ("5", "must be a duration like 5s, 200ms or 1m, got '5'"),
        ("5 s", "must be a duration like 5s, 200ms or 1m, got '5 s'"),
        ("5S", "must be a duration like 5s, 200ms or 1m, got '5S'"),
        ("s", "must be a duration like 5s, 200ms or 1m, got 's'"),
        (True, "must be a duration like 5s, 200ms or 1m, got True"),
        (False, "must be a duration like 5s, 200ms or 1m, got False"),
        (None, "must be a duration like 5s, 200ms or 1m, got None"),
        ([5], "must be a duration like 5s, 200ms or 1m, got [5]"),
    ],
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == message


def test_parse_duration_rejects_whitespace_only() -> None:
    with pytest.raises(ValueError):
        parse_duration("   ")


def test_parse_duration_rejects_huge_integer_with_value_error() -> None:
    with pytest.raises(ValueError):
        parse_duration(10**400)


@pytest.mark.parametrize("field", ["retry", "loadfactor"])
def test_huge_integer_in_a_pool_is_invalid_not_a_crash(field: str) -> None:
    (error,) = member_errors(**{field: 10**400})
    assert error.startswith(f"spec.members[0].{field}: ")


def test_parse_duration_rejects_overflowing_string() -> None:
    with pytest.raises(ValueError):
        parse_duration("9" * 400 + "s")


# ---------------------------------------------------------------------------------------------
# Parsing into dataclasses

FULL_POOL = f"""\
{HEADER}metadata:
  name: shop
  namespace: prod
  labels: {{app: shop}}
  annotations: {{note: x}}
  uid: 1234
status: {{members: []}}
spec:
  listen: 127.0.0.1:9090
  routes:
  - path: /shop
    backendPath: /app
    reverse: false
    preserveHost: true
    hosts: [Shop.Example.com, a.example.com]
  - path: /static
  lbmethod: bybusyness
  maxattempts: 3
  nofailover: On
  forcerecovery: Off
  timeout: 30s
  failonstatus: [500, 503]
  failontimeout: true
  stickysession: JSESSIONID|jsessionid
  stickysessionsep: "_"
  scolonpathdelim: on
  memberDefaults:
    retry: 10s
    timeout: 20s
    loadfactor: 3
    pool: {{max: 8, ttl: 1m, keepalive: true}}
  members:
  - url: http://10.0.0.1:8080/base/
    name: one
    route: r1
    loadfactor: 1.5
    lbset: 1
    status: +H
    redirect: r2
    retry: 500ms
    connectiontimeout: 2s
    pool: {{min: 1, max: 4, smax: 2, ttl: 30s, acquire: 100ms, keepalive: true, disablereuse: false}}
  - url: http://[::1]:81
    name: two
    route: r2
  - url: http://backend.local
    route: 7
"""

DEFAULT_POOL = ConnectionPoolSpec(max=8, ttl=60.0, keepalive=True)


def test_full_pool_parses_into_dataclasses() -> None:
    (pool,) = parse_pools(FULL_POOL)
    assert pool == BalancerPool(
        name="shop",
        namespace="prod",
        listen=("127.0.0.1", 9090),
        routes=(
            RouteSpec(path="/shop", backend_path="/app", reverse=False, preserve_host=True,
                      hosts=("a.example.com", "shop.example.com")),
            RouteSpec(path="/static", backend_path="/static"),
        ),
        lbmethod=LBMethod.BYBUSYNESS,
        maxattempts=3,
        nofailover=True,
        forcerecovery=False,
        timeout=30.0,
        failonstatus=frozenset({500, 503}),
        failontimeout=True,
        stickysession=StickySession(cookie="JSESSIONID", param="jsessionid"),
        stickysessionsep="_",
        scolonpathdelim=True,
        members=(
            MemberSpec(url="http://10.0.0.1:8080/base/", host="10.0.0.1", port=8080, base_path="/base",
                       name="one", route="r1", loadfactor=1.5, lbset=1, status=frozenset({"H"}),
                       redirect="r2", retry=0.5, timeout=20.0, connectiontimeout=2.0,
                       pool=ConnectionPoolSpec(min=1, max=4, smax=2, ttl=30.0, acquire=0.1,
                                               keepalive=True, disablereuse=False)),
            MemberSpec(url="http://[::1]:81", host="::1", port=81, base_path="", name="two", route="r2",
                       loadfactor=3.0, retry=10.0, timeout=20.0, connectiontimeout=20.0,
                       pool=DEFAULT_POOL),
            MemberSpec(url="http://backend.local", host="backend.local", port=80, base_path="",
                       name="http://backend.local", route="7", loadfactor=3.0, retry=10.0, timeout=20.0,
                       connectiontimeout=20.0, pool=DEFAULT_POOL),
        ),
    )
    assert pool.balancer_name == "balancer://shop"
    assert pool.stickysession is not None and pool.stickysession.names == "JSESSIONID|jsessionid"
    assert [m.authority for m in pool.members] == ["10.0.0.1:8080", "[::1]:81", "backend.local:80"]


def test_minimal_pool_takes_httpd_defaults() -> None:
    text = HEADER + "metadata: {name: web}\nspec:\n  routes: [{path: /}]\n  members: [{url: 'http://b:81'}]\n"
    (pool,) = parse_pools(text)
    assert pool == BalancerPool(
        name="web",
        namespace=None,
        listen=None,
        routes=(RouteSpec(path="/", backend_path="/", reverse=True, preserve_host=False, hosts=()),),
        lbmethod=LBMethod.BYREQUESTS,
        maxattempts=1,
        nofailover=False,
        forcerecovery=True,
        timeout=0.0,
        failonstatus=frozenset(),
        failontimeout=False,
        stickysession=None,
        stickysessionsep=".",
        scolonpathdelim=False,
        members=(
            MemberSpec(url="http://b:81", host="b", port=81, base_path="", name="http://b:81", route=None,
                       loadfactor=1.0, lbset=0, status=frozenset(), redirect=None, retry=60.0,
                       timeout=60.0, connectiontimeout=60.0,
                       pool=ConnectionPoolSpec(min=0, max=None, smax=None, ttl=None, acquire=None,
                                               keepalive=False, disablereuse=False)),
        ),
    )


@pytest.mark.parametrize(("count", "attempts"), [(0, 1), (1, 1), (2, 1), (3, 2), (5, 4)])
def test_maxattempts_defaults_to_members_minus_one_but_at_least_one(count: int, attempts: int) -> None:
    members = [{"url": f"http://10.0.0.{i}:80"} for i in range(count)]
    assert parse_one(pool_doc(members)).maxattempts == attempts


def test_explicit_maxattempts_wins_even_zero() -> None:
    members = [{"url": f"http://10.0.0.{i}:80"} for i in range(4)]
    assert parse_one(pool_doc(members, maxattempts=0)).maxattempts == 0


def test_connectiontimeout_defaults_to_the_members_timeout() -> None:
    pool = parse_one(pool_doc([{"url": "http://a", "timeout": "5s"},
                               {"url": "http://b", "timeout": "5s", "connectiontimeout": "250ms"}]))
    assert [(m.timeout, m.connectiontimeout) for m in pool.members] == [(5.0, 5.0), (5.0, 0.25)]


def test_member_defaults_are_merged_under_each_members_own_fields() -> None:
    defaults = {"timeout": "5s", "loadfactor": 3, "retry": "10s", "status": "H", "lbset": 2,
                "connectiontimeout": "1s", "pool": {"max": 4}}
    pool = parse_one(pool_doc(
        [
            {"url": "http://a", "name": "a", "loadfactor": 1, "status": "D"},
            {"url": "http://b", "name": "b", "timeout": "7s", "lbset": 0},
            {"url": "http://c", "name": "c"},
        ],
        memberDefaults=defaults,
    ))
    got = [(m.name, m.loadfactor, m.status, m.lbset, m.retry, m.timeout, m.connectiontimeout, m.pool.max)
           for m in pool.members]
    assert got == [
        ("a", 1.0, frozenset({"D"}), 2, 10.0, 5.0, 1.0, 4),
        ("b", 3.0, frozenset({"H"}), 0, 10.0, 7.0, 1.0, 4),
        ("c", 3.0, frozenset({"H"}), 2, 10.0, 5.0, 1.0, 4),
    ]


@pytest.mark.parametrize(
    ("status", "flags"),
    [
        ("D", {"D"}),
        ("+H", {"H"}),
        ("DH", {"D", "H"}),
        ("+D+H", {"D", "H"}),
        ("dh", {"D", "H"}),
        ("-D", set()),
        ("D-D", set()),
        ("+D-D+H", {"H"}),
        ("SIRENC", {"S", "I", "R", "E", "N", "C"}),
        (["D", "H"], {"D", "H"}),
        (["+H"], {"H"}),
        (["N"], {"N"}),
    ],
)
def test_status_flag_syntax(status: object, flags: set[str]) -> None:
    pool = parse_one(pool_doc([{"url": "http://a", "status": status}]))
    assert pool.members[0].status == frozenset(flags)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("JSESSIONID|jsessionid", StickySession("JSESSIONID", "jsessionid")),
        # httpd: a name without "|" is both the cookie and the URL parameter.
        ("JSESSIONID", StickySession("JSESSIONID", "JSESSIONID")),
        ("|jsessionid", StickySession(None, "jsessionid")),
        ("ROUTEID|", StickySession("ROUTEID", None)),
    ],
)
def test_stickysession_cookie_and_param(value: str, expected: StickySession) -> None:
    pool = parse_one(pool_doc(stickysession=value))
    assert pool.stickysession == expected
    assert pool.stickysession.names == value.strip("|")


@pytest.mark.parametrize("value", ["a|b|c", "|", "bad cookie", "a;b"])
def test_stickysession_rejects_bad_names(value: str) -> None:
    assert spec_errors(stickysession=value) == [
        f"spec.stickysession: must be COOKIE or COOKIE|param with token characters, got {value!r}"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("off", None), ("Off", None), ("'off'", None), ("OFF", None), ("'_'", "_"), ("':'", ":"),
     ("'.'", ".")],
)
def test_stickysessionsep(text: str, expected: str | None) -> None:
    doc = HEADER + "metadata: {name: web}\nspec:\n  routes: [{path: /}]\n"
    (pool,) = parse_pools(doc + f"  stickysessionsep: {text}\n")
    assert pool.stickysessionsep == expected


@pytest.mark.parametrize("value", ["ab", "=", ";", ",", " "])
def test_stickysessionsep_rejects(value: str) -> None:
    assert spec_errors(stickysessionsep=value) == [
        f"spec.stickysessionsep: must be one character such as '.', or 'off', got {value!r}"]


@pytest.mark.parametrize(
    ("value", "codes"),
    [
        ([500, 503], {500, 503}),
        ("500,503", {500, 503}),
        ("500, 502 ,503", {500, 502, 503}),
        (503, {503}),
        (["500,502", 503], {500, 502, 503}),
    ],
)
def test_failonstatus_list_and_comma_forms(value: object, codes: set[int]) -> None:
    assert parse_one(pool_doc(failonstatus=value)).failonstatus == frozenset(codes)


@pytest.mark.parametrize(("value", "shown"), [(99, "99"), (600, "600"), ("5xx", "'5xx'"),
                                              ([500, "abc"], "'abc'"), (True, "True")])
def test_failonstatus_rejects(value: object, shown: str) -> None:
    assert spec_errors(failonstatus=value) == [
        f"spec.failonstatus: must be HTTP status codes 100..599, got {shown}"]


@pytest.mark.parametrize(
    ("text", "value"),
    [("On", True), ("Off", False), ("on", True), ("off", False), ("'On'", True), ("'OFF'", False),
     ("yes", True), ("no", False), ("true", True), ("false", False)],
)
def test_httpd_style_booleans(text: str, value: bool) -> None:
    doc = HEADER + "metadata: {name: web}\nspec:\n" + f"  routes: [{{path: /, reverse: {text}}}]\n"
    doc += f"  nofailover: {text}\n  failontimeout: {text}\n  scolonpathdelim: {text}\n"
    doc += f"  forcerecovery: {text}\n  members: [{{url: 'http://a', pool: {{keepalive: {text}}}}}]\n"
    (pool,) = parse_pools(doc)
    assert (pool.nofailover, pool.failontimeout, pool.scolonpathdelim, pool.forcerecovery) == (value,) * 4
    assert pool.routes[0].reverse is value
    assert pool.members[0].pool.keepalive is value


@pytest.mark.parametrize(("value", "shown"), [("maybe", "'maybe'"), (1, "1"), ("1", "'1'")])
def test_booleans_reject_other_values(value: object, shown: str) -> None:
    assert spec_errors(nofailover=value) == [f"spec.nofailover: must be true or false, got {shown}"]


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("127.0.0.1:8080", ("127.0.0.1", 8080)), (":8080", ("0.0.0.0", 8080)), ("[::1]:80", ("::1", 80))],
)
def test_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_one(pool_doc(listen=listen)).listen == expected


@pytest.mark.parametrize(("listen", "shown"), [("8080", "'8080'"), ("host:99999", "'host:99999'"),
                                               ("host:http", "'host:http'")])
def test_listen_rejects(listen: str, shown: str) -> None:
    assert spec_errors(listen=listen) == [
        f"spec.listen: must be HOST:PORT such as 127.0.0.1:8080, got {shown}"]


# ---------------------------------------------------------------------------------------------
# Validation: every error at once, each with its exact path


@pytest.mark.parametrize(
    ("api", "kind", "expected"),
    [
        ("v1", "Pod", ["apiVersion: must be balancerpool.io/v1alpha1, got 'v1'",
                       "kind: must be BalancerPool, got 'Pod'"]),
        (None, KIND, ["apiVersion: must be balancerpool.io/v1alpha1, got None"]),
        (API_VERSION, "balancerpool", ["kind: must be BalancerPool, got 'balancerpool'"]),
    ],
)
def test_wrong_api_version_and_kind(api: str | None, kind: str, expected: list[str]) -> None:
    doc = pool_doc()
    doc["apiVersion"], doc["kind"] = api, kind
    assert errors_of(doc) == expected


@pytest.mark.parametrize("name", ["Web", "web_1", "-web", "web-", "a" * 64, "", "web.shop"])
def test_bad_metadata_name(name: str) -> None:
    assert errors_of(pool_doc(name=name)) == [f"metadata.name: {DNS_LABEL} {name!r}"]


def test_missing_metadata_name() -> None:
    doc = pool_doc()
    del doc["metadata"]
    assert errors_of(doc) == [f"metadata.name: {DNS_LABEL} ''"]


def test_unknown_metadata_field_but_kubernetes_fields_are_ignored() -> None:
    doc = pool_doc()
    doc["metadata"].update({"labels": {"a": "b"}, "annotations": {}, "uid": "u", "resourceVersion": "1",
                            "generation": 2, "creationTimestamp": "t", "managedFields": [],
                            "finalizers": [], "ownerReferences": [], "color": "red"})
    assert errors_of(doc) == ["metadata.color: unknown field"]


def test_non_string_metadata_name_is_one_error() -> None:
    doc = pool_doc()
    doc["metadata"]["name"] = 5
    assert errors_of(doc) == ["metadata.name: must be a string, got a number"]


def test_missing_spec_is_reported_first() -> None:
    doc = pool_doc()
    del doc["spec"]
    assert errors_of(doc)[0] == "spec: is required"


def test_missing_spec_is_the_only_error() -> None:
    doc = pool_doc()
    del doc["spec"]
    assert errors_of(doc) == ["spec: is required"]


def test_spec_must_be_a_mapping() -> None:
    doc = pool_doc()
    doc["spec"] = ["routes"]
    assert errors_of(doc)[0] == "spec: must be a mapping, got a list"


@pytest.mark.parametrize("routes", [None, []])
def test_missing_routes(routes: list[Any] | None) -> None:
    assert spec_errors(routes=routes) == ["spec.routes: needs at least one route (path prefix) to serve"]


def test_routes_must_be_a_list() -> None:
    assert spec_errors(routes={"path": "/"}) == ["spec.routes: must be a list, got a mapping"]


def test_route_without_path() -> None:
    assert spec_errors(routes=[{"backendPath": "/x"}]) == ["spec.routes[0].path: is required"]


@pytest.mark.parametrize("path", ["app", "/a b", "/a?x=1", "/a#frag", "/a//b", ""])
def test_route_path_must_be_absolute(path: str) -> None:
    assert spec_errors(routes=[{"path": "/ok"}, {"path": path}]) == [
        f"spec.routes[1].path: must be an absolute path like /app without query or spaces, got {path!r}"]


def test_route_backend_path_and_hosts_are_checked() -> None:
    assert spec_errors(routes=[{"path": "/a", "backendPath": "b", "hosts": "x"}]) == [
        "spec.routes[0].backendPath: must be an absolute path like /app without query or spaces, got 'b'",
        "spec.routes[0].hosts: must be a list of host names",
    ]


def test_duplicate_routes_name_the_first() -> None:
    routes = [{"path": "/a"}, {"path": "/b"}, {"path": "/a"}, {"path": "/a", "hosts": ["x"]},
              {"path": "/b"}]
    assert sorted(spec_errors(routes=routes)) == [
        "spec.routes[2].path: '/a' repeats routes[0]",
        "spec.routes[4].path: '/b' repeats routes[1]",
    ]


def test_trailing_slash_does_not_make_a_route_different() -> None:
    assert spec_errors(routes=[{"path": "/a"}, {"path": "/a/"}]) == [
        "spec.routes[1].path: '/a/' repeats routes[0]"]


def test_routes_differing_only_in_host_order_repeat() -> None:
    routes = [{"path": "/a", "hosts": ["x", "Y"]}, {"path": "/a", "hosts": ["y", "x"]}]
    assert spec_errors(routes=routes) == ["spec.routes[1].path: '/a' repeats routes[0]"]


def test_invalid_route_path_does_not_cause_a_false_duplicate() -> None:
    assert spec_errors(routes=[{"path": "app"}, {"path": "/"}]) == [
        "spec.routes[0].path: must be an absolute path like /app without query or spaces, got 'app'"]


def test_unknown_fields_at_every_level() -> None:
    doc = pool_doc(
        [{"url": "http://a", "zap": 5, "pool": {"zip": 6}}],
        memberDefaults={"baz": 3, "pool": {"qux": 4}},
        foo=1,
        routes=[{"path": "/", "bar": 2}],
    )
    doc["extra"] = 1
    doc["status"] = {"anything": "goes"}  # written by the operator, ignored on input
    assert sorted(errors_of(doc)) == [
        "extra: unknown field",
        "spec.foo: unknown field",
        "spec.memberDefaults.baz: unknown field",
        "spec.memberDefaults.pool.qux: unknown field",
        "spec.members[0].pool.zip: unknown field",
        "spec.members[0].zap: unknown field",
        "spec.routes[0].bar: unknown field",
    ]


def test_bad_lbmethod() -> None:
    assert spec_errors(lbmethod="roundrobin") == [
        "spec.lbmethod: must be one of byrequests, bytraffic, bybusyness, "
        "leastrequest, random, hash, got 'roundrobin'"]


@pytest.mark.parametrize("method", list(LBMethod))
def test_every_lbmethod_is_accepted(method: LBMethod) -> None:
    doc = pool_doc(lbmethod=method.value)
    if method is LBMethod.HASH:
        doc["spec"]["hash"] = {"on": "client"}
    assert parse_one(doc).lbmethod is method


@pytest.mark.parametrize(("value", "attempts"), [(-1, "must be 0..100, got -1"),
                                                 (101, "must be 0..100, got 101"),
                                                 ("3", "must be a whole number 0..100, got '3'")])
def test_bad_maxattempts(value: object, attempts: str) -> None:
    assert spec_errors(maxattempts=value) == [f"spec.maxattempts: {attempts}"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (250, "must be 1..100, got 250"),
        (0, "must be 1..100, got 0"),
        (0.5, "must be 1..100, got 0.5"),
        (100.5, "must be 1..100, got 100.5"),
        (1.234, "takes at most two decimals, got 1.234"),
        ("heavy", "must be a number 1..100, got 'heavy'"),
        (True, "must be a number 1..100, got True"),
    ],
)
def test_bad_loadfactor(value: object, reason: str) -> None:
    assert member_errors(loadfactor=value) == [f"spec.members[0].loadfactor: {reason}"]


@pytest.mark.parametrize("value", [1, 1.25, 99.99, 100])
def test_good_loadfactor(value: float) -> None:
    assert parse_one(pool_doc([{"url": "http://a", "loadfactor": value}])).members[0].loadfactor == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [(-1, "must be 0..99, got -1"), (100, "must be 0..99, got 100"),
     (1.5, "must be a whole number 0..99, got 1.5"), ("1", "must be a whole number 0..99, got '1'")],
)
def test_bad_lbset(value: object, reason: str) -> None:
    assert member_errors(lbset=value) == [f"spec.members[0].lbset: {reason}"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("X", "unknown status flag 'X': flags are D S I H R E N C"),
        ("+Dx", "unknown status flag 'x': flags are D S I H R E N C"),
        ("D1", "must be status flags from DSIHRENC such as 'D' or '+H', got 'D1'"),
        ("++D", "must be status flags from DSIHRENC such as 'D' or '+H', got '++D'"),
        (5, "must be status flags from DSIHRENC such as 'D' or '+H', got 5"),
    ],
)
def test_bad_status(value: object, reason: str) -> None:
    assert member_errors(status=value) == [f"spec.members[0].status: {reason}"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://10.0.0.1:21", "must be an http:// URL such as http://10.0.0.5:8080, got 'ftp://10.0.0.1:21'"),
        ("https://10.0.0.1", "must be an http:// URL such as http://10.0.0.5:8080, got 'https://10.0.0.1'"),
        ("10.0.0.1:8080", "must be an http:// URL such as http://10.0.0.5:8080, got '10.0.0.1:8080'"),
        ("http://", "must be http://HOST[:PORT][/path] without query or credentials, got 'http://'"),
        ("http://a/?x=1", "must be http://HOST[:PORT][/path] without query or credentials, got 'http://a/?x=1'"),
        ("http://u:p@a", "must be http://HOST[:PORT][/path] without query or credentials, got 'http://u:p@a'"),
        ("http://a:99999", "has an invalid port: 'http://a:99999'"),
        ("http://a:http", "has an invalid port: 'http://a:http'"),
        ("http://a:-1", "has an invalid port: 'http://a:-1'"),
    ],
)
def test_bad_member_url(url: str, reason: str) -> None:
    assert member_errors(url=url) == [f"spec.members[0].url: {reason}"]


def test_member_url_is_required_and_a_string() -> None:
    assert errors_of(pool_doc([{"name": "a"}, {"url": 8080, "name": "b"}])) == [
        "spec.members[0].url: is required",
        "spec.members[1].url: must be a string, got a number",
    ]


def test_member_url_port_zero_is_rejected() -> None:
    assert member_errors(url="http://a:0") == ["spec.members[0].url: has an invalid port: 'http://a:0'"]


def test_member_url_with_password_only_is_rejected() -> None:
    assert member_errors(url="http://:secret@a") == [
        "spec.members[0].url: must be http://HOST[:PORT][/path] without query or credentials, "
        "got 'http://:secret@a'"]


def test_members_without_url_are_not_reported_as_duplicate_names() -> None:
    assert errors_of(pool_doc([{"route": "a"}, {"route": "b"}])) == [
        "spec.members[0].url: is required",
        "spec.members[1].url: is required",
    ]


def test_duplicate_member_names_and_routes_name_the_first() -> None:
    members = [
        {"url": "http://a", "name": "a", "route": "r1"},
        {"url": "http://b", "name": "b", "route": "r2"},
        {"url": "http://c", "name": "a", "route": "r3"},
        {"url": "http://d", "name": "d", "route": "r2"},
        {"url": "http://e", "name": "b", "route": "r1"},
        {"url": "http://a"},
        {"url": "http://a"},
    ]
    assert sorted(errors_of(pool_doc(members))) == [
        "spec.members[2].name: 'a' repeats members[0]",
        "spec.members[3].route: 'r2' repeats members[1]",
        "spec.members[4].name: 'b' repeats members[1]",
        "spec.members[4].route: 'r1' repeats members[0]",
        "spec.members[6].name: 'http://a' repeats members[5]",
    ]


def test_redirect_must_name_another_members_route() -> None:
    members = [
        {"url": "http://a", "route": "a", "redirect": "b"},
        {"url": "http://b", "route": "b", "redirect": "b"},
        {"url": "http://c", "route": "c", "redirect": "z"},
        {"url": "http://d", "redirect": "a"},
    ]
    assert sorted(errors_of(pool_doc(members))) == [
        "spec.members[1].redirect: must name another member's route, not its own",
        "spec.members[2].redirect: names no member's route: 'z'",
    ]


@pytest.mark.parametrize(("route", "shown"), [("a b", "'a b'"), ("x" * 65, repr("x" * 65)), ("", "''")])
def test_bad_route_value(route: str, shown: str) -> None:
    assert member_errors(route=route) == [
        f"spec.members[0].route: must be 1..64 URL-safe characters, got {shown}"]


@pytest.mark.parametrize(
    ("pool", "errors"),
    [
        ({"min": 5, "max": 2}, ["min: must not exceed max (2), got 5"]),
        ({"smax": 5, "max": 2}, ["smax: must not exceed max (2), got 5"]),
        ({"min": 3, "smax": 2}, ["min: must not exceed smax (2), got 3"]),
        ({"min": 1, "disablereuse": True}, ["min: pre-opened connections make no sense with disablereuse"]),
        ({"max": 0}, ["max: must be 1..100000, got 0"]),
        ({"ttl": "soon"}, ["ttl: must be a duration like 5s, 200ms or 1m, got 'soon'"]),
        ({"acquire": -1}, ["acquire: must be a non-negative duration, got -1"]),
        ({"min": 2, "max": 2, "smax": 2, "disablereuse": False}, []),
    ],
)
def test_connection_pool_checks(pool: dict[str, Any], errors: list[str]) -> None:
    doc = pool_doc([{"url": "http://a", "pool": pool}])
    if errors:
        assert errors_of(doc) == [f"spec.members[0].pool.{e}" for e in errors]
    else:
        assert parse_one(doc).members[0].pool == ConnectionPoolSpec(min=2, max=2, smax=2)


def test_pool_min_above_max_and_smax_reports_both() -> None:
    assert sorted(member_errors(pool={"min": 9, "max": 4, "smax": 3})) == [
        "spec.members[0].pool.min: must not exceed max (4), got 9",
        "spec.members[0].pool.min: must not exceed smax (3), got 9",
    ]


def test_member_must_be_a_mapping() -> None:
    assert errors_of(pool_doc([{"url": "http://a"}, "http://b"])) == [
        "spec.members[1]: must be a mapping, got a string",
        "spec.members[1].url: is required",
    ]


@pytest.mark.parametrize("key", ["route", "redirect", "url", "name"])
def test_per_member_fields_in_member_defaults_are_reported_once(key: str) -> None:
    value = "http://x" if key == "url" else "x"
    members = [{"url": "http://a", "name": "a", "route": "a"}, {"url": "http://b", "name": "b"}]
    assert errors_of(pool_doc(members, memberDefaults={key: value})) == [
        f"spec.memberDefaults.{key}: is per member; it cannot be a default"]


def test_all_per_member_fields_in_member_defaults() -> None:
    members = [{"url": "http://a"}, {"url": "http://b"}]
    defaults = {"route": "x", "redirect": "y", "url": "http://z", "name": "n", "retry": "2s"}
    assert sorted(errors_of(pool_doc(members, memberDefaults=defaults))) == [
        "spec.memberDefaults.name: is per member; it cannot be a default",
        "spec.memberDefaults.redirect: is per member; it cannot be a default",
        "spec.memberDefaults.route: is per member; it cannot be a default",
        "spec.memberDefaults.url: is per member; it cannot be a default",
    ]


def test_bad_member_defaults_are_reported_at_their_own_path_only() -> None:
    members = [{"url": "http://a"}, {"url": "http://b", "loadfactor": 0}, {"url": "http://c"}]
    defaults = {"loadfactor": 300, "retry": "soon", "pool": {"min": 5, "max": 2}}
    assert sorted(errors_of(pool_doc(members, memberDefaults=defaults))) == [
        "spec.memberDefaults.loadfactor: must be 1..100, got 300",
        "spec.memberDefaults.pool.min: must not exceed max (2), got 5",
        "spec.memberDefaults.retry: must be a duration like 5s, 200ms or 1m, got 'soon'",
        "spec.members[1].loadfactor: must be 1..100, got 0",
    ]


def test_member_defaults_must_be_a_mapping() -> None:
    assert spec_errors(memberDefaults=["retry"]) == ["spec.memberDefaults: must be a mapping, got a list"]


def test_many_errors_are_all_reported_at_once() -> None:
    doc = pool_doc(
        [
            {"url": "http://a", "route": "a"},
            {"url": "ftp://b", "route": "a"},
            {"url": "http://c", "loadfactor": 250, "lbset": 100, "status": "+X", "retry": "soon",
             "redirect": "z", "pool": {"min": 5, "max": 2}, "colour": "blue"},
        ],
        name="Bad",
        lbmethod="rr",
        routes=[{"path": "x"}],
    )
    assert sorted(errors_of(doc)) == sorted([
        f"metadata.name: {DNS_LABEL} 'Bad'",
        "spec.lbmethod: must be one of byrequests, bytraffic, bybusyness, "
        "leastrequest, random, hash, got 'rr'",
        "spec.routes[0].path: must be an absolute path like /app without query or spaces, got 'x'",
        "spec.members[1].url: must be an http:// URL such as http://10.0.0.5:8080, got 'ftp://b'",
        "spec.members[1].route: 'a' repeats members[0]",
        "spec.members[2].loadfactor: must be 1..100, got 250",
        "spec.members[2].lbset: must be 0..99, got 100",
        "spec.members[2].status: unknown status flag 'X': flags are D S I H R E N C",
        "spec.members[2].retry: must be a duration like 5s, 200ms or 1m, got 'soon'",
        "spec.members[2].redirect: names no member's route: 'z'",
        "spec.members[2].pool.min: must not exceed max (2), got 5",
        "spec.members[2].colour: unknown field",
    ])


# ---------------------------------------------------------------------------------------------
# Files: YAML problems and multiple documents


def test_yaml_syntax_error_has_line_and_column() -> None:
    text = HEADER + "metadata: {name: web}\nspec:\n  routes: [{path: /}\n"
    (error,) = errors_of_text(text)
    assert error.startswith("line 6, column 1: not valid YAML: ")


def test_yaml_syntax_error_in_a_block() -> None:
    assert errors_of_text("a: [\n") == [
        "line 2, column 1: not valid YAML: expected the node content, but found '<stream end>'"]


def test_duplicate_yaml_keys_are_refused() -> None:
    text = HEADER + "metadata: {name: web}\nspec:\n  routes: [{path: /}]\n  routes: [{path: /x}]\n"
    assert errors_of_text(text) == ["line 6, column 3: not valid YAML: duplicate key 'routes'"]


def test_unhashable_yaml_key_is_invalid_not_a_crash() -> None:
    (error,) = errors_of_text("? [a, b]\n: 1\n")
    assert error.startswith("line 1, column ")


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "---\n...\n---\n"])
def test_empty_file(text: str) -> None:
    assert errors_of_text(text) == ["(file): holds no BalancerPool"]


@pytest.mark.parametrize(("text", "kind"),
                         [("- a\n", "a list"), ("hello\n", "a string"), ("5\n", "a number")])
def test_non_mapping_document_is_invalid(text: str, kind: str) -> None:
    (error,) = errors_of_text(text)
    assert error.endswith(f"must be a mapping, got {kind}")


def test_non_mapping_document_error_has_a_path() -> None:
    with pytest.raises(InvalidBalancerPool) as info:
        parse_pools("- a\n")
    assert all(e.path for e in info.value.errors)


@pytest.mark.parametrize(("where", "expected"), [("top", ":"), ("spec", "spec:")])
def test_empty_key_is_reported_with_a_path(where: str, expected: str) -> None:
    doc = pool_doc()
    (doc if where == "top" else doc["spec"])[""] = 1
    (error,) = errors_of(doc)
    assert error.endswith("unknown field")
    assert not error.startswith(expected)


def test_parse_pool_appends_errors_to_the_given_list() -> None:
    errors: list[FieldError] = []
    assert parse_pool(pool_doc(lbmethod="x"), errors) is not None
    assert [str(e) for e in errors] == [
        "spec.lbmethod: must be one of byrequests, bytraffic, bybusyness, "
        "leastrequest, random, hash, got 'x'"]
    good: list[FieldError] = []
    pool = parse_pool(pool_doc(), good)
    assert good == [] and pool is not None and pool.name == "web"


def dump_all(*docs: object) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def test_multiple_documents_parse_in_order() -> None:
    a = pool_doc(name="a", routes=[{"path": "/a"}])
    b = pool_doc(name="b", routes=[{"path": "/b"}])
    assert [p.name for p in parse_pools(dump_all(a, b))] == ["a", "b"]


def test_multi_document_errors_are_prefixed_with_the_document() -> None:
    good = pool_doc(name="good", routes=[{"path": "/g"}])
    bad = pool_doc(name="bad", routes=[{"path": "/b"}], lbmethod="rr")
    nameless = pool_doc(routes=[{"path": "/n"}])
    nameless["metadata"] = {}
    nameless["kind"] = "Other"
    assert errors_of_text(dump_all(good, bad, nameless)) == [
        "documents[1] (BalancerPool bad): spec.lbmethod: must be one of byrequests, bytraffic, "
        "bybusyness, leastrequest, random, hash, got 'rr'",
        "documents[2]: kind: must be BalancerPool, got 'Other'",
        f"documents[2]: metadata.name: {DNS_LABEL} ''",
    ]


def test_single_document_errors_have_no_prefix() -> None:
    assert errors_of_text(dump_all(pool_doc(lbmethod="rr"))) == [
        "spec.lbmethod: must be one of byrequests, bytraffic, bybusyness, "
        "leastrequest, random, hash, got 'rr'"]


def test_multi_document_non_mapping_document() -> None:
    errors = errors_of_text(dump_all(pool_doc(), ["x"]))
    assert len(errors) == 1
    assert errors[0].startswith("documents[1]")
    assert errors[0].endswith("must be a mapping, got a list")


@pytest.mark.parametrize("metadata", [None, "web", ["web"]])
def test_multi_document_with_bad_metadata_is_invalid_not_a_crash(metadata: object) -> None:
    broken = pool_doc()
    broken["metadata"] = metadata
    errors = errors_of_text(dump_all(pool_doc(name="ok", routes=[{"path": "/ok"}]), broken))
    assert errors and all(e.startswith("documents[1]") for e in errors)


def test_two_pools_with_the_same_name() -> None:
    a = pool_doc(name="web", routes=[{"path": "/a"}])
    b = pool_doc(name="web", routes=[{"path": "/b"}])
    c = pool_doc(name="other", routes=[{"path": "/c"}])
    assert errors_of_text(dump_all(a, c, b)) == [
        "documents[2] (BalancerPool web): metadata.name: BalancerPool 'web' is defined twice"]


def test_two_pools_with_the_same_name_names_the_repeating_document() -> None:
    a = pool_doc(name="web", routes=[{"path": "/a"}])
    b = pool_doc(name="web", routes=[{"path": "/b"}])
    (error,) = errors_of_text(dump_all(a, b))
    assert error.startswith("documents[1]")


def test_two_pools_cannot_serve_the_same_route() -> None:
    a = pool_doc(name="a", routes=[{"path": "/x"}, {"path": "/shared"}])
    b = pool_doc(name="b", routes=[{"path": "/shared/"}])
    c = pool_doc(name="c", routes=[{"path": "/shared", "hosts": ["c.example"]}])
    (error,) = errors_of_text(dump_all(a, b, c))
    assert error.endswith("spec.routes[0].path: '/shared/' is already served by BalancerPool 'a'")
    assert "b" in error.split(":")[0]


def test_route_conflict_is_labelled_like_other_multi_document_errors() -> None:
    a = pool_doc(name="a", routes=[{"path": "/shared"}])
    b = pool_doc(name="b", routes=[{"path": "/shared"}])
    assert errors_of_text(dump_all(a, b)) == [
        "documents[1] (BalancerPool b): spec.routes[0].path: '/shared' is already served by BalancerPool 'a'"]


def test_same_name_in_different_namespaces_is_allowed() -> None:
    a = pool_doc(name="web", routes=[{"path": "/a"}])
    b = pool_doc(name="web", routes=[{"path": "/b"}])
    b["metadata"]["namespace"] = "other"
    assert [(p.namespace, p.name) for p in parse_pools(dump_all(a, b))] == [(None, "web"), ("other", "web")]


# ---------------------------------------------------------------------------------------------
# Examples


def test_demo_pool_example_parses() -> None:
    (pool,) = parse_pools((EXAMPLES / "demo-pool.yaml").read_text(encoding="utf-8"))
    assert pool.name == "demo"
    assert pool.listen == ("127.0.0.1", 8080)
    assert pool.routes == (RouteSpec(path="/", backend_path="/"),)
    assert pool.lbmethod is LBMethod.BYREQUESTS
    assert pool.stickysession == StickySession("JSESSIONID", "jsessionid")
    assert pool.scolonpathdelim is True
    assert pool.maxattempts == 2
    got = [(m.name, m.route, m.port, m.loadfactor, m.status, m.retry, m.timeout, m.connectiontimeout)
           for m in pool.members]
    assert got == [
        ("alpha", "a", 8081, 1.0, frozenset(), 10.0, 30.0, 1.0),
        ("beta", "b", 8082, 2.0, frozenset(), 10.0, 30.0, 1.0),
        ("gamma", "c", 8083, 1.0, frozenset({"H"}), 10.0, 30.0, 1.0),
    ]


INVALID_EXAMPLE_ERRORS = [
    f"metadata.name: {DNS_LABEL} 'Broken_Name'",
    "spec.lbmethod: must be one of byrequests, bytraffic, bybusyness, "
    "leastrequest, random, hash, got 'roundrobin'",
    "spec.routes[0].path: must be an absolute path like /app without query or spaces, got 'app'",
    "spec.maxattempts: must be 0..100, got -1",
    "spec.members[1].url: must be an http:// URL such as http://10.0.0.5:8080, got 'ftp://127.0.0.1:9002'",
    "spec.members[1].route: 'a' repeats members[0]",
    "spec.members[2].loadfactor: must be 1..100, got 250",
    "spec.members[2].status: unknown status flag 'X': flags are D S I H R E N C",
    "spec.members[2].retry: must be a duration like 5s, 200ms or 1m, got 'soon'",
    "spec.members[2].redirect: names no member's route: 'z'",
    "spec.members[2].pool.min: must not exceed max (2), got 5",
    "spec.members[2].colour: unknown field",
]


def test_invalid_pool_example_shows_every_problem() -> None:
    errors = errors_of_text((EXAMPLES / "invalid-pool.yaml").read_text(encoding="utf-8"))
    assert sorted(errors) == sorted(INVALID_EXAMPLE_ERRORS)


# ---------------------------------------------------------------------------------------------
# balancerpool check


def test_cli_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(pool_doc([{"url": "http://a"}, {"url": "http://b"}])), encoding="utf-8")
    assert cli_main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: ok: web (2 members)\n"
    assert err == ""


def test_cli_check_demo_example(capsys: pytest.CaptureFixture[str]) -> None:
    path = EXAMPLES / "demo-pool.yaml"
    assert cli_main(["check", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok: demo (3 members)\n"


def test_cli_check_invalid_lists_every_error(capsys: pytest.CaptureFixture[str]) -> None:
    path = EXAMPLES / "invalid-pool.yaml"
    assert cli_main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == f"{path}: invalid, {len(INVALID_EXAMPLE_ERRORS)} problem(s):"
    assert sorted(lines[1:]) == sorted(f"  {e}" for e in INVALID_EXAMPLE_ERRORS)


def test_cli_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.yaml"
    assert cli_main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{path}: cannot be read: ")


def test_cli_check_several_files_fails_if_any_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(pool_doc()), encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [\n", encoding="utf-8")
    assert cli_main(["check", str(good), str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out == f"{good}: ok: web (1 members)\n"
    assert err.splitlines() == [
        f"{bad}: invalid, 1 problem(s):",
        "  line 2, column 1: not valid YAML: expected the node content, but found '<stream end>'",
    ]


# ---------------------------------------------------------------------------------------------
# Property: parse_pools never crashes on YAML-able data


FIELD_NAMES = ["apiVersion", "kind", "metadata", "name", "namespace", "spec", "routes", "path", "hosts",
               "members", "memberDefaults", "url", "route", "redirect", "status", "loadfactor", "lbset",
               "pool", "min", "max", "smax", "retry", "timeout", "stickysession", "failonstatus"]

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)  # beyond a float: once an OverflowError
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
    | st.sampled_from(["http://a:1", "http://b", "/", "/x", "D", "+H", "5s", "on", "Off", "a", "b",
                       "byrequests", API_VERSION, KIND, "500,503", "J|j"])
)
KEYS = st.sampled_from(FIELD_NAMES) | st.text(max_size=6)
YAML_DATA = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=25,
)

VALID_DOC: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": KIND,
    "metadata": {"name": "web", "namespace": "ns"},
    "spec": {
        "listen": "127.0.0.1:8080",
        "routes": [{"path": "/", "backendPath": "/b", "hosts": ["x"], "reverse": True,
                    "preserveHost": False}],
        "lbmethod": "byrequests", "maxattempts": 2, "nofailover": False, "forcerecovery": True,
        "timeout": "5s", "failonstatus": [500], "failontimeout": False, "stickysession": "J|j",
        "stickysessionsep": ".", "scolonpathdelim": False,
        "memberDefaults": {"retry": "10s", "pool": {"max": 5}},
        "members": [
            {"url": "http://a:1", "name": "a", "route": "a", "loadfactor": 2, "lbset": 0, "status": "D",
             "redirect": "b", "retry": 1, "timeout": 1, "connectiontimeout": 1,
             "pool": {"min": 0, "max": 2, "smax": 1, "ttl": 1, "acquire": 1, "keepalive": True,
                      "disablereuse": False}},
            {"url": "http://b:2", "name": "b", "route": "b"},
        ],
    },
}


def _paths(node: object, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


VALID_PATHS = _paths(VALID_DOC)[1:]


def test_valid_doc_for_mutations_is_valid() -> None:
    (pool,) = parse_pools(yaml.safe_dump(VALID_DOC))
    assert [m.name for m in pool.members] == ["a", "b"]


def check_never_crashes(text: str) -> None:
    try:
        pools = parse_pools(text)
    except InvalidBalancerPool as exc:
        assert exc.errors
        for error in exc.errors:
            assert isinstance(error, FieldError)
            assert error.path and error.reason, error
    else:
        assert pools and all(isinstance(p, BalancerPool) for p in pools)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, YAML_DATA, max_size=6) | YAML_DATA)
def test_parse_pools_on_arbitrary_mappings_only_raises_invalid(data: Any) -> None:
    check_never_crashes(yaml.safe_dump(data))


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(VALID_PATHS), st.booleans(), YAML_DATA), min_size=1, max_size=3))
def test_parse_pools_on_mutated_pools_only_raises_invalid(
    mutations: list[tuple[tuple[str | int, ...], bool, Any]],
) -> None:
    doc = copy.deepcopy(VALID_DOC)
    for path, delete, value in mutations:
        node: Any = doc
        try:
            for key in path[:-1]:
                node = node[key]
            if delete:
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced a parent
    check_never_crashes(yaml.safe_dump(doc))
