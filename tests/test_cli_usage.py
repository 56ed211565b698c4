"""The command line as a newcomer meets it: help that lists what there is, --json everywhere, one rule
for repeats, and odd input refused with one line before any work."""

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys

import asyncpg
import msgspec
import pytest

from app import cli
from app.auth import RESERVED_SUBDOMAINS
from bench.server import free_port
from tests.support import ROOT
from tests.test_cli import assert_one_line_error, headoni, headoni_all, new_desk, ok_json, subdomain


def subparsers_action(parser: argparse.ArgumentParser) -> "argparse._SubParsersAction[argparse.ArgumentParser] | None":
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = subparsers_action(parser)
    return dict(action.choices) if action else {}


def every_command() -> list[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of every runnable command: migrate, serve, and each group's actions."""
    found = []
    for name, parser in subparsers(cli.parser()).items():
        actions = subparsers(parser)
        found += [(f"{name} {a}", p) for a, p in actions.items()] if actions else [(name, parser)]
    return found


def test_every_group_lists_its_actions_one_line_each_with_examples() -> None:
    groups = {name: p for name, p in subparsers(cli.parser()).items() if subparsers(p)}
    assert set(groups) == {"desk", "token", "department", "ticket-type", "blocklist"}
    for name, parser in groups.items():
        shown = headoni("postgresql://unused/none", name, "--help")  # help needs no database
        assert shown.returncode == 0 and shown.stdout == parser.format_help()
        actions = subparsers_action(parser)
        assert actions is not None
        summaries = {a.dest: a.help for a in actions._choices_actions}
        for action in actions.choices:
            line = re.compile(rf"^    {re.escape(action)} +{re.escape(str(summaries[action]))}$", re.MULTILINE)
            assert line.search(shown.stdout), (name, action, shown.stdout)  # one line each
            assert f"\n  headoni {name} {action}" in shown.stdout  # its example
        assert "list" in subparsers(parser), f"{name} has no list"


@pytest.mark.parametrize(("name", "parser"), every_command(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_has_a_working_example_and_takes_json(name: str, parser: argparse.ArgumentParser) -> None:
    text = parser.format_help()
    assert "\nexample:\n  headoni " + name in text, text
    example = text.split("\nexample:\n  ", 1)[1].splitlines()[0]
    args = cli.parser().parse_args(shlex.split(example)[1:])  # the example is a valid command line
    assert args.json is False
    assert cli.parser().parse_args([*shlex.split(example)[1:], "--json"]).json is True
    assert "--json" in text


def test_a_group_without_an_action_names_the_actions() -> None:
    shown = headoni("postgresql://unused/none", "department")
    assert_one_line_error(shown, "choose one of create, list, delete", "headoni department --help")
    top = headoni("postgresql://unused/none")
    assert_one_line_error(top, "choose one of migrate, serve, desk, token, department, ticket-type, blocklist")


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    assert result.returncode == 0 and result.stderr == "", (result.args, result.stderr)
    values = [msgspec.json.decode(line) for line in result.stdout.splitlines()]
    assert all(isinstance(v, dict) for v in values), result.stdout
    return values


def test_every_command_prints_json_objects_one_per_line(database_url: str) -> None:
    sub = subdomain()
    desk = ok_json(headoni(database_url, "desk", "create", sub, "--json"))
    token, dep, kind = (ok_json(r) for r in headoni_all(database_url, [
        ("token", "create", "--desk", sub, "--name", "T", "--scope", "tickets:read", "--json"),
        ("department", "create", "--desk", sub, "Billing", "--json"),
        ("ticket-type", "create", "--desk", sub, "Bug", "--json"),
    ]))
    assert json_lines(headoni(database_url, "migrate", "--json")) == [{"applied": []}]
    desks = json_lines(headoni(database_url, "desk", "list", "--json"))
    assert desk in desks and desks == sorted(desks, key=lambda d: str(d["subdomain"]))

    listed = headoni_all(database_url, [
        ("token", "list", "--desk", sub, "--json"),
        ("department", "list", "--desk", sub, "--json"),
        ("ticket-type", "list", "--desk", sub, "--json"),
    ])
    tokens, departments, kinds = (json_lines(r) for r in listed)
    assert [(t["id"], t["revoked"]) for t in tokens] == [(token["id"], False)]
    assert departments == [
        {"id": desk["defaultDepartmentId"], "name": "General", "public": True, "default": True, "deleted": False},
        {**dep, "deleted": False},
    ]
    assert kinds == [
        {"id": desk["defaultTicketTypeId"], "name": "General", "default": True, "archived": False},
        {**kind, "archived": False},
    ]

    # A state set once changes something; set again it changes nothing, exits 0, and says so.
    setters = [
        ("token", "revoke", "--desk", sub, str(token["id"]), "--json"),
        ("department", "delete", "--desk", sub, str(dep["id"]), "--json"),
        ("ticket-type", "archive", "--desk", sub, str(kind["id"]), "--json"),
        ("blocklist", "add", "--desk", sub, "Spam.Example", "--json"),
    ]
    first = [json_lines(r) for r in headoni_all(database_url, setters)]
    again = [json_lines(r) for r in headoni_all(database_url, setters)]
    assert first == [
        [{"id": token["id"], "revoked": True, "changed": True}],
        [{"id": dep["id"], "deleted": True, "changed": True}],
        [{"id": kind["id"], "archived": True, "changed": True}],
        [{"entry": "spam.example", "blocked": True, "changed": True}],
    ]
    assert again == [[{**lines[0], "changed": False}] for lines in first]
    blocked = headoni(database_url, "blocklist", "list", "--desk", sub, "--json")
    assert json_lines(blocked) == [{"entry": "spam.example"}]
    removes = [
        json_lines(headoni(database_url, "blocklist", "remove", "--desk", sub, entry, "--json"))
        for entry in ("SPAM.example", "spam.example")
    ]
    assert removes == [
        [{"entry": "spam.example", "blocked": False, "changed": True}],
        [{"entry": "spam.example", "blocked": False, "changed": False}],
    ]
    assert headoni(database_url, "blocklist", "list", "--desk", sub, "--json").stdout == ""
    assert json_lines(headoni(database_url, "department", "list", "--desk", sub, "--json"))[1]["deleted"] is True


def test_list_commands_print_a_line_per_object_for_people(database_url: str) -> None:
    sub, desk = new_desk(database_url)
    ok_json(headoni(database_url, "department", "create", "--desk", sub, "Billing", "--private", "--json"))
    desks, departments, kinds, blocklist, tokens = headoni_all(database_url, [
        ("desk", "list"),
        ("department", "list", "--desk", sub),
        ("ticket-type", "list", "--desk", sub),
        ("blocklist", "list", "--desk", sub),
        ("token", "list", "--desk", sub),
    ])
    assert f"{desk['id']}  {sub}  {sub}" in desks.stdout.splitlines()
    lines = departments.stdout.splitlines()
    assert lines[0] == f"{desk['defaultDepartmentId']}  General  public  default"
    assert lines[1].endswith("  Billing  private") and len(lines) == 2
    assert kinds.stdout == f"{desk['defaultTicketTypeId']}  General  default\n"
    assert blocklist.stdout == f"the blocklist of desk {sub} is empty\n"
    assert tokens.stdout == f"no token on desk {sub}\n"


def test_reserved_and_blank_desk_names(database_url: str) -> None:
    reserved = sorted(RESERVED_SUBDOMAINS)
    assert {"www", "api", "app", "admin", "docs", "status", "mail", "localhost"} <= RESERVED_SUBDOMAINS
    results = headoni_all(database_url, [("desk", "create", name.upper()) for name in reserved])
    for name, result in zip(reserved, results, strict=True):
        assert_one_line_error(result, f"subdomain {name.upper()!r} is reserved", ", ".join(reserved))

    a, b, c = subdomain(), subdomain(), subdomain()
    empty, blank, none = (ok_json(r) for r in headoni_all(database_url, [
        ("desk", "create", a, "--name", "", "--json"),
        ("desk", "create", b, "--name", "  ", "--json"),
        ("desk", "create", c, "--json"),
    ]))
    assert (empty["name"], blank["name"], none["name"]) == (a, b, c)  # blank like absent: the subdomain


def test_blocklist_errors_speak_of_what_was_typed(database_url: str) -> None:
    sub, _ = new_desk(database_url)
    domains = ["not an entry", "spam", "sp_am.example", "spam..example", ".spam.example", "spam-.example",
               "a" * 64 + ".example", "xn--zz.example"]
    results = headoni_all(database_url, [("blocklist", "add", "--desk", sub, "--", e) for e in domains])
    for entry, result in zip(domains, results, strict=True):
        assert_one_line_error(result, f"bad blocklist entry {entry!r}: not a domain (such as spam.example)")
        assert "@-sign" not in result.stderr and "email address" not in result.stderr, result.stderr
    address, at_domain = headoni_all(database_url, [
        ("blocklist", "add", "--desk", sub, "Bob@@Spam.example"),
        ("blocklist", "add", "--desk", sub, "@spam.example"),
    ])
    assert_one_line_error(address, "bad blocklist address 'Bob@@Spam.example'")
    assert_one_line_error(at_domain, "bad blocklist address '@spam.example'", "give it without the @")


def run_serve(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "serve", *args], cwd=ROOT, env={**os.environ, **env},
        text=True, capture_output=True, timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--workers", "0"], {}, "argument --workers: must be a whole number, at least 1, not '0'"),
        (["--workers", "-2"], {}, "argument --workers: must be a whole number, at least 1, not '-2'"),
        ([], {"HEADONI_WORKERS": "0"}, "HEADONI_WORKERS must be at least 1, not '0'"),
        ([], {"HEADONI_WORKERS": "two"}, "HEADONI_WORKERS must be a number, not 'two'"),
        (["--port", "70000"], {}, "not a port (1 to 65535): '70000'"),
    ],
)
def test_serve_refuses_odd_workers_and_ports_in_one_line(
    empty_database: str, args: list[str], env: dict[str, str], says: str
) -> None:
    result = run_serve(*args, DATABASE_URL=empty_database, **env)
    assert_one_line_error(result, says)


async def test_a_port_in_use_is_one_line_before_any_work(empty_database: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("--port", str(port), DATABASE_URL=empty_database)
    assert_one_line_error(result, f"headoni: port {port} is in use; try --port")
    assert result.stderr == f"headoni: port {port} is in use; try --port\n"
    conn = await asyncpg.connect(empty_database)
    try:  # nothing was migrated: the check came first
        assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
    finally:
        await conn.close()


def test_serve_on_a_database_without_desks_says_how_to_make_one(empty_database: str) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)], cwd=ROOT,
        env={**os.environ, "DATABASE_URL": empty_database}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    with process.stdout:
        try:
            first = process.stdout.readline()  # printed before uvicorn starts
        finally:
            process.terminate()
            process.wait(20)
    assert first == "No desk yet. Make one: headoni desk create SUBDOMAIN\n"
