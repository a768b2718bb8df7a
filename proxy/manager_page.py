"""The balancer-manager page: server-rendered HTML with its CSS inline, no script, no external
asset. One table per pool (cards on a narrow screen); every form posts to the JSON API's own URL,
form-encoded, with the pool's nonce and the session's CSRF token."""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

FLAG_LABELS = (("D", "Disabled"), ("N", "Draining"), ("H", "Hot standby"), ("S", "Stopped"),
               ("I", "Ignore errors"), ("R", "Hot spare"))
LBMETHODS = ("byrequests", "bytraffic", "bybusyness", "leastrequest", "random", "hash")
HEALTH_METHODS = ("off", "TCP", "OPTIONS", "HEAD", "GET")

CSS = """
:root { color-scheme: light dark; --fg: #1b1f24; --bg: #fff; --muted: #5c6670; --line: #d5dbe1;
  --head: #f3f5f7; --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; --accent: #0969da; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6edf3; --bg: #0d1117; --muted: #9aa5b1;
  --line: #30363d; --head: #161b22; --ok: #3fb950; --bad: #f85149; --warn: #d29922;
  --accent: #58a6ff; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: var(--bg); }
header.top { padding: .8rem 1.2rem; border-bottom: 1px solid var(--line); display: flex;
  flex-wrap: wrap; gap: .4rem 1.2rem; align-items: baseline; }
header.top h1 { font-size: 1.25rem; margin: 0; }
header.top .who { color: var(--muted); font-size: .9rem; }
main { padding: 0 1.2rem 2rem; max-width: 110rem; }
section.pool { margin-top: 1.4rem; }
section.pool > h2 { font-size: 1.15rem; margin: 0 0 .3rem; }
.meta { color: var(--muted); font-size: .9rem; margin: 0 0 .6rem; }
.meta b { color: var(--fg); font-weight: 600; }
.notice { margin: 1rem 0 0; padding: .6rem .9rem; border-left: 4px solid var(--ok);
  background: var(--head); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; }
th, td { padding: .35rem .5rem; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; white-space: nowrap; }
th { background: var(--head); font-weight: 600; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.name { font-weight: 600; }
.url, .small { color: var(--muted); font-size: .82rem; }
.badge { display: inline-block; padding: 0 .45em; border-radius: 1em; font-size: .8rem;
  font-weight: 600; border: 1px solid currentColor; }
.ok { color: var(--ok); } .bad { color: var(--bad); } .warn { color: var(--warn); }
.flags { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; letter-spacing: .1em; }
.reason { white-space: normal; min-width: 12rem; max-width: 26rem; }
details > summary { cursor: pointer; color: var(--accent); }
details[open] > summary { margin-bottom: .4rem; }
form.edit { display: grid; grid-template-columns: repeat(auto-fill, minmax(9.5rem, 1fr));
  gap: .4rem .8rem; align-items: end; white-space: normal; min-width: 18rem; }
form.edit label { display: flex; flex-direction: column; font-size: .8rem; color: var(--muted); }
form.edit fieldset { grid-column: 1 / -1; border: 1px solid var(--line); border-radius: .4rem;
  display: flex; flex-wrap: wrap; gap: .2rem 1rem; padding: .3rem .6rem; margin: 0; }
form.edit fieldset label { flex-direction: row; gap: .3rem; color: var(--fg); font-size: .85rem;
  align-items: center; }
input, select, button { font: inherit; font-size: .9rem; color: inherit; }
input[type=text], input[type=number], select { padding: .25rem .4rem; border: 1px solid var(--line);
  border-radius: .3rem; background: var(--bg); width: 100%; }
button { padding: .35rem .9rem; border-radius: .35rem; border: 1px solid var(--accent);
  background: var(--accent); color: #fff; cursor: pointer; }
.panels { display: grid; grid-template-columns: repeat(auto-fit, minmax(20rem, 1fr)); gap: .8rem;
  margin-top: .8rem; }
.panel { border: 1px solid var(--line); border-radius: .5rem; padding: .6rem .8rem; }
.panel h3 { font-size: .95rem; margin: 0 0 .4rem; }
@media (max-width: 760px) {
  main, header.top { padding-left: .7rem; padding-right: .7rem; }
  table, thead, tbody, tr, td { display: block; width: 100%; }
  thead { display: none; }
  tr { border: 1px solid var(--line); border-radius: .5rem; margin: .7rem 0; padding: .3rem .5rem; }
  td { border: 0; display: flex; justify-content: space-between; gap: 1rem; white-space: normal;
    padding: .2rem 0; text-align: right; }
  td::before { content: attr(data-label); color: var(--muted); text-align: left; font-size: .82rem; }
  td.num { text-align: right; }
  td.member { display: block; text-align: left; font-size: 1rem; }
  td.member::before { content: none; }
  td.edit { display: block; text-align: left; }
  td.edit::before { content: none; }
  .reason { max-width: none; min-width: 0; }
  td .v { text-align: right; } td.member .v, td.edit .v { text-align: left; }
  form.edit { min-width: 0; grid-template-columns: 1fr 1fr; }
}
"""


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _ago(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m {s % 60}s ago"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m ago"
    return f"{s // 86400}d {s % 86400 // 3600}h ago"


def _number(value: float) -> str:
    return f"{value:g}"


def _hidden(csrf: str, nonce: str) -> str:
    return (f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
            f'<input type="hidden" name="nonce" value="{_e(nonce)}">')


def _flag_boxes(current: str) -> str:
    boxes = "".join(
        f'<label><input type="checkbox" name="status" value="{f}"'
        f'{" checked" if f in current else ""}> {f} <span class="small">{label}</span></label>'
        for f, label in FLAG_LABELS)
    # The empty hidden value makes "no box checked" mean "clear every flag".
    return f'<fieldset><legend class="small">Status</legend><input type="hidden" name="status" ' \
           f'value="">{boxes}</fieldset>'


def _member_form(pool: dict[str, Any], m: dict[str, Any], csrf: str) -> str:
    action = f"/api/pools/{quote(pool['name'], safe='')}/members/{quote(m['name'], safe='')}"
    return (
        f'<details><summary>Edit</summary>'
        f'<form class="edit" method="post" action="{_e(action)}" data-member="{_e(m["name"])}">'
        f'{_hidden(csrf, pool["nonce"])}'
        f'<label>Load factor<input type="number" name="loadfactor" min="1" max="100" step="0.01" '
        f'value="{_number(m["loadfactor"])}"></label>'
        f'<label>LB set<input type="number" name="lbset" min="0" max="99" value="{m["lbset"]}">'
        f'</label>'
        f'<label>Route<input type="text" name="route" value="{_e(m["route"])}"></label>'
        f'<label>Route redirect<input type="text" name="redirect" value="{_e(m["redirect"])}">'
        f'</label>'
        f'{_flag_boxes(m["status"])}'
        f'<button type="submit">Apply</button></form></details>')


def _state(m: dict[str, Any]) -> str:
    state = m["state"]
    css = "ok" if m["usable"] else "bad"
    if m["usable"] and any(f in m["flags"] for f in "NHR"):
        css = "warn"
    return (f'<span class="badge {css}">{_e(state["text"])}</span>'
            f'<div class="small">{_e(state["signal"])}: {_e(state["detail"] or "-")}, '
            f'<span title="{_e(state["at"])}">{_ago(state["ago"])}</span></div>')


def _health(m: dict[str, Any]) -> str:
    hc = m["healthCheck"]
    if hc is None:
        return '<span class="small">-</span>'
    css, word = ("ok", "passed") if hc["ok"] else ("bad", "failed")
    return (f'<span class="{css}">{word}</span> <span class="small">{_ago(hc["ago"])}</span>'
            f'<div class="small">{_e(hc["detail"])}</div>')


COLUMNS = ("Member", "Route", "Redir", "Set", "Factor", "Status", "State", "Elected", "Busy",
           "To", "From", "Errors", "Health check", "Conns open / idle", "WS", "")


NUMERIC = frozenset({"Set", "Factor", "Elected", "Busy", "To", "From", "Errors", "WS"})


def _member_row(pool: dict[str, Any], m: dict[str, Any], csrf: str) -> str:
    cells = [
        ("member", f'<div class="name">{_e(m["name"])}</div><div class="url">{_e(m["url"])}</div>'),
        ("", _e(m["route"] or "-")),
        ("", _e(m["redirect"] or "-")),
        ("num", str(m["lbset"])),
        ("num", _number(m["loadfactor"])),
        ("", f'<span class="flags">{_e(m["flags"] or "-")}</span>'),
        ("reason", _state(m)),
        ("num", str(m["elected"])),
        ("num", str(m["busy"])),
        ("num", _bytes(m["sent"])),
        ("num", _bytes(m["received"])),
        ("num", str(m["errors"])),
        ("reason", _health(m)),
        ("num", f'{m["connections"]["open"]} / {m["connections"]["idle"]}'),
        ("num", str(m["websockets"])),
        ("edit", _member_form(pool, m, csrf)),
    ]
    tds = "".join(f'<td class="{css}" data-label="{_e(label)}"><div class="v">{html}</div></td>'
                  for (css, html), label in zip(cells, COLUMNS, strict=True))
    return f'<tr id="member-{_e(pool["name"])}-{_e(m["name"])}">{tds}</tr>'


def _options(values: tuple[str, ...], current: str) -> str:
    return "".join(f'<option{" selected" if v == current else ""}>{_e(v)}</option>' for v in values)


def _pool_forms(pool: dict[str, Any], csrf: str) -> str:
    name = quote(pool["name"], safe="")
    hc = pool["healthCheck"] or {}
    settings = (
        f'<div class="panel"><h3>Pool settings</h3>'
        f'<form class="edit" method="post" action="/api/pools/{_e(name)}" data-form="pool">'
        f'{_hidden(csrf, pool["nonce"])}'
        f'<label>LB method<select name="lbmethod">{_options(LBMETHODS, pool["lbmethod"])}</select>'
        f'</label>'
        f'<label>Timeout<input type="text" name="timeout" value="{_number(pool["timeout"])}s">'
        f'</label>'
        f'<label>Max attempts<input type="number" name="maxattempts" min="0" max="100" '
        f'value="{pool["maxattempts"]}"></label>'
        f'<label>Sticky session<input type="text" name="stickysession" '
        f'value="{_e(pool["stickysession"])}" placeholder="JSESSIONID|jsessionid"></label>'
        f'<button type="submit">Apply</button></form></div>')
    health = (
        f'<div class="panel"><h3>Health check</h3>'
        f'<form class="edit" method="post" action="/api/pools/{_e(name)}" data-form="health">'
        f'{_hidden(csrf, pool["nonce"])}'
        f'<label>Method<select name="healthCheck.method">'
        f'{_options(HEALTH_METHODS, hc.get("method", "off"))}</select></label>'
        f'<label>URI<input type="text" name="healthCheck.uri" value="{_e(hc.get("uri", "/"))}"></label>'
        f'<label>Interval<input type="text" name="healthCheck.interval" '
        f'value="{_number(hc.get("interval", 30.0))}s"></label>'
        f'<label>Timeout<input type="text" name="healthCheck.timeout" '
        f'value="{_number(hc.get("timeout", 5.0))}s"></label>'
        f'<label>Passes<input type="number" name="healthCheck.passes" min="1" max="100" '
        f'value="{hc.get("passes", 1)}"></label>'
        f'<label>Fails<input type="number" name="healthCheck.fails" min="1" max="100" '
        f'value="{hc.get("fails", 1)}"></label>'
        f'<button type="submit">Apply</button></form></div>')
    add = (
        f'<div class="panel"><h3>Add a member</h3>'
        f'<form class="edit" method="post" action="/api/pools/{_e(name)}/members" data-form="add">'
        f'{_hidden(csrf, pool["nonce"])}'
        f'<label>URL<input type="text" name="url" required placeholder="http://10.0.0.5:8080">'
        f'</label>'
        f'<label>Name<input type="text" name="name" placeholder="(the URL)"></label>'
        f'<label>Route<input type="text" name="route"></label>'
        f'<label>Route redirect<input type="text" name="redirect"></label>'
        f'<label>Load factor<input type="number" name="loadfactor" min="1" max="100" step="0.01" '
        f'value="1"></label>'
        f'<label>LB set<input type="number" name="lbset" min="0" max="99" value="0"></label>'
        f'{_flag_boxes("")}'
        f'<button type="submit">Add</button></form></div>')
    return f'<div class="panels">{settings}{health}{add}</div>'


def _pool_section(pool: dict[str, Any], csrf: str) -> str:
    hc = pool["healthCheck"]
    hc_text = (f'{_e(hc["method"])} {_e(hc["uri"] if hc["method"] != "TCP" else "")} every '
               f'{_number(hc["interval"])}s' if hc else "none")
    reasons = ", ".join(f"{_e(k)} {v}" for k, v in pool["routeReasons"].items()) or "-"
    meta = (f'<p class="meta">routes <b>{_e(", ".join(pool["routes"]))}</b> · lbmethod '
            f'<b>{_e(pool["lbmethod"])}</b> · timeout <b>{_number(pool["timeout"])}s</b> · '
            f'maxattempts <b>{pool["maxattempts"]}</b> · stickysession '
            f'<b>{_e(pool["stickysession"] or "off")}</b> · health check <b>{hc_text}</b> · '
            f'route decisions <b>{reasons}</b></p>')
    head = "".join(f'<th class="{"num" if c in NUMERIC else ""}">{_e(c)}</th>' for c in COLUMNS)
    rows = "".join(_member_row(pool, m, csrf) for m in pool["members"])
    return (f'<section class="pool" id="pool-{_e(pool["name"])}" data-pool="{_e(pool["name"])}">'
            f'<h2>{_e(pool["balancer"])}</h2>{meta}'
            f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
            f'</div>{_pool_forms(pool, csrf)}</section>')


def _document(title: str, body: str) -> str:
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>{body}</body></html>")


def render_page(pools: list[dict[str, Any]], *, csrf: str, identity: str, notice: str | None,
                persist: bool, single: bool = False) -> str:
    """The page for ``pools`` (snapshots from :func:`.admin.pool_snapshot`)."""
    where = "changes are written back to the configuration" if persist else \
        "changes last until the next reload or restart"
    links = " ".join(f'<a href="/balancer-manager/{_e(quote(p["name"], safe=""))}">{_e(p["name"])}</a>'
                     for p in pools) if not single else '<a href="/balancer-manager">all pools</a>'
    header = (f'<header class="top"><h1>balancer-manager</h1><span class="who">logged in as '
              f'{_e(identity)} · {where}</span><span class="small">{links}</span></header>')
    note = f'<p class="notice" role="status">Changed: {_e(notice)}</p>' if notice else ""
    sections = "".join(_pool_section(p, csrf) for p in pools) or "<p>No pool is configured.</p>"
    return _document("balancer-manager", f"{header}<main>{note}{sections}</main>")


def render_error(status: int, reason: str, errors: list[dict[str, str]]) -> str:
    items = "".join(f"<li><b>{_e(e.get('field'))}</b>: {_e(e.get('reason'))}</li>" for e in errors)
    body = (f'<header class="top"><h1>balancer-manager</h1></header><main>'
            f'<p class="notice" style="border-color: var(--bad)" role="alert"><b>{status}</b> '
            f'{_e(reason)}</p>{f"<ul>{items}</ul>" if items else ""}'
            f'<p><a href="/balancer-manager">Back to the balancer-manager</a></p></main>')
    return _document(f"{status} - balancer-manager", body)
