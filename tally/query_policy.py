"""What an API query may read: ClickHouse's own AST of one SELECT, checked against an allow-list of tally's tables."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tally.errors import QueryRefused

# Functions that reach outside tally's tables: the host's files, the network, other tables by name, dictionaries,
# server internals, or that only burn time. Compared case-insensitively (ClickHouse keeps the spelling it was given).
DENIED_FUNCTIONS = frozenset(name.lower() for name in (
    "file", "url", "s3", "hdfs", "azureBlobStorage", "remote", "remoteSecure", "executable",
    "joinGet", "joinGetOrNull", "hasColumnInTable", "catboostEvaluate", "naiveBayesClassifier",
    "getSetting", "getSettingOrDefault", "getServerSetting", "getMergeTreeSetting", "getMacro", "getClientHTTPHeader",
    "hostName", "hostname", "fqdn", "tcpPort", "getServerPort", "serverUUID", "uptime", "buildId", "displayName",
    "version", "getOSKernelVersion", "filesystemAvailable", "filesystemCapacity", "filesystemUnreserved",
    "currentUser", "currentProfiles", "currentRoles", "enabledRoles", "defaultRoles", "currentQueryID",
    "initialQueryID", "queryID", "shardNum", "shardCount", "zookeeperSessionUptime", "globalVariable",
    "addressToLine", "addressToLineWithInlines", "addressToSymbol", "demangle", "trace", "logTrace",
    "sleep", "sleepEachRow", "transactionID", "transactionLatestSnapshot", "transactionOldestSnapshot",
    "input",
))
# dictGet, dictHas, …: dictionaries can be sourced from files, URLs and other servers.
_DENIED_PREFIXES = ("dict",)
# Membership tests whose right side may name a table (`x IN system.users`).
_IN_FUNCTIONS = frozenset({"in", "notin", "globalin", "globalnotin", "nullin", "notnullin", "globalnullin",
                           "globalnotnullin"})
_SELECT_PARTS = frozenset({"SelectWithUnionQuery", "SelectQuery", "SelectIntersectExceptQuery", "TablesInSelectQuery"})
_LINE = re.compile(r"^(?P<indent> *)(?P<kind>\w+)(?: (?P<name>.*?))?(?: \(alias (?P<alias>[^)]*)\))?"
                   r"(?: \(children \d+\))?$")


@dataclass
class Node:
    """One node of `EXPLAIN AST` output: its kind (SelectQuery, Function, TableIdentifier, …), name and children."""

    kind: str
    name: str = ""
    children: list[Node] = field(default_factory=list)

    def walk(self) -> Iterator[tuple[Node, Node | None]]:
        """Every node under (and including) this one, with its parent."""
        stack: list[tuple[Node, Node | None]] = [(self, None)]
        while stack:
            node, parent = stack.pop()
            yield node, parent
            stack.extend((c, node) for c in reversed(node.children))


def parse_explain_ast(lines: Sequence[str]) -> Node:
    """The tree of ClickHouse's `EXPLAIN AST` text (one node per line, one space of indent per level)."""
    root: Node | None = None
    path: list[Node] = []
    for line in lines:
        m = _LINE.match(line.rstrip("\n"))
        if m is None:
            raise QueryRefused(f"cannot read the parser's output line {line!r}")
        depth = len(m.group("indent"))
        node = Node(m.group("kind"), (m.group("name") or "").strip())
        if depth == 0:
            if root is not None:
                raise QueryRefused("the parser returned more than one statement")
            root = node
            path = [node]
            continue
        if depth > len(path):
            raise QueryRefused(f"cannot read the parser's output: line {line!r} skips a level")
        del path[depth:]
        path[-1].children.append(node)
        path.append(node)
    if root is None:
        raise QueryRefused("the parser returned nothing")
    return root


def check_select(root: Node, database: str, result_format: str = "Native") -> None:
    """Refuse (QueryRefused) any statement but one SELECT (or WITH … SELECT) over `database`'s tables and views.

    `root` is the AST of the query as the client sends it, with its `FORMAT result_format` appended. Refused: other
    statements, INTO OUTFILE, a FORMAT or SETTINGS clause of the query's own, table functions, tables of any other
    database (system, information_schema, …) whether in FROM, JOIN or on the right of IN, and the functions of
    DENIED_FUNCTIONS (files, network, server internals, sleeping). Unqualified tables resolve to `database`: the
    API connection's current database.
    """
    if root.kind != "SelectWithUnionQuery":
        raise QueryRefused(f"only a SELECT (or WITH … SELECT) is accepted, not {root.kind.removesuffix('Query')}")
    extra = root.children[1:]
    if not root.children or root.children[0].kind != "ExpressionList" or len(extra) != 1 \
            or (extra[0].kind, extra[0].name) != ("Identifier", result_format):
        raise QueryRefused("INTO OUTFILE, FORMAT and SETTINGS clauses are not accepted; the API picks the format")
    for node, parent in root.walk():
        if node.kind in ("SetQuery", "Set"):
            raise QueryRefused("a SETTINGS clause is not accepted: API queries run with fixed limits")
        if node.kind in ("SelectWithUnionQuery", "SelectQuery", "ExpressionList") or parent is None:
            continue
        if node.kind == "Function":
            if parent.kind == "TableExpression":
                raise QueryRefused(f"table function {node.name}() is not accepted: read tally's tables only")
            _check_function(node, database)
        elif node.kind == "TableIdentifier":
            _check_table(node.name, database)
        elif node.kind.endswith("Query") and node.kind not in _SELECT_PARTS:
            raise QueryRefused(f"{node.kind} is not accepted inside a SELECT")


def _check_function(node: Node, database: str) -> None:
    name = node.name.lower()
    if name in DENIED_FUNCTIONS or name.startswith(_DENIED_PREFIXES):
        raise QueryRefused(f"function {node.name}() is not accepted: it reaches outside tally's tables")
    if name in _IN_FUNCTIONS and node.children and len(node.children[0].children) == 2:
        right = node.children[0].children[1]
        if right.kind == "Identifier":
            _check_table(right.name, database)


def _check_table(name: str, database: str) -> None:
    db, dot, _ = name.partition(".")
    if dot and db != database:
        raise QueryRefused(f"table {name} is not accepted: only the {database} database's tables can be read")
