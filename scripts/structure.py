#!/usr/bin/env python3
"""Measures the shape of src/ (issue 13): the file-level import graph, its cycles, imports that
run upward against lib.rs's crate map, the longest HTTP handlers, and the ways tests wire the
app. Run from the repository root: `python3 scripts/structure.py` (`--json` for machine output).

A file's imports are the `crate::a::b` and `super::x` paths it names (in `use` lines and inline),
resolved to the deepest module file that exists. "Upward" means a module that comes later in
lib.rs's crate map (lower in the data flow) naming one that comes earlier.
"""

import json
import pathlib
import re
import sys

SRC = pathlib.Path("src")


def module_of(path: pathlib.Path) -> tuple:
    """src/dicom/dimse.rs -> ('dicom', 'dimse'); src/dicom/mod.rs -> ('dicom',)."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    if parts in (["lib"], ["main"]):
        return ()
    return tuple(parts)


def files() -> dict:
    out = {}
    for p in sorted(SRC.rglob("*.rs")):
        if p.name in ("main.rs", "lib.rs"):
            continue
        out[module_of(p)] = p
    return out


def strip_tests(text: str) -> str:
    """Drops `#[cfg(test)] mod tests { ... }` blocks (tests may reach anywhere) and comments
    (a doc link is not a dependency)."""
    i = text.find("#[cfg(test)]")
    text = text if i < 0 else text[:i]
    return "\n".join(re.sub(r"//.*$", "", line) for line in text.splitlines())


def resolve(mods: dict, path: tuple):
    """Deepest existing module that is a prefix of `path`."""
    for n in range(len(path), 0, -1):
        if path[:n] in mods:
            return path[:n]
    return None


PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^}]*)\}", re.S)


def imports(mods: dict, me: tuple, text: str) -> set:
    found = set()

    def add(base: str, rest: list):
        if base == "crate":
            target = tuple(rest)
        else:
            parent = me[:-1] if mods[me].name != "mod.rs" else me[:-1]
            target = parent + tuple(rest)
        t = resolve(mods, target)
        if t and t != me and not (me[: len(t)] == t):
            found.add(t)

    for m in GROUP.finditer(text):
        prefix = [p for p in m.group(2).split("::") if p]
        for item in m.group(3).split(","):
            item = item.strip().split(" as ")[0].strip()
            if not item or item == "self":
                add(m.group(1), prefix)
                continue
            add(m.group(1), prefix + [p for p in item.split("::") if p and p != "{"])
    for m in PATH.finditer(text):
        add(m.group(1), [p for p in m.group(2).split("::") if p])
    return found


def crate_order() -> list:
    """Top-level modules in the order lib.rs's `//!` map lists them."""
    order = []
    for line in (SRC / "lib.rs").read_text().splitlines():
        m = re.match(r"//! - \[`([a-z_]+)`\]", line)
        if m:
            order.append(m.group(1))
    return order


def sccs(graph: dict) -> list:
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def handlers() -> list:
    """Lengths of `async fn` bodies in src/api: route handlers (the functions with a
    `#[utoipa::path]` attribute, from which the router registers them) are named `route:`,
    the others (middleware, helpers) `helper:`."""
    out = []
    for p in sorted((SRC / "api").rglob("*.rs")):
        lines = strip_tests(p.read_text()).splitlines()
        i, routed = 0, False
        while i < len(lines):
            routed = routed or lines[i].lstrip().startswith("#[utoipa::path(")
            m = re.match(r"\s*(pub(\([a-z]+\))? )?async fn ([a-z0-9_]+)", lines[i])
            if m:
                depth, start, j, opened = 0, i, i, False
                while j < len(lines):
                    depth += lines[j].count("{") - lines[j].count("}")
                    opened = opened or "{" in lines[j]
                    if opened and depth <= 0:
                        break
                    j += 1
                kind = "route" if routed else "helper"
                out.append((j - start + 1, f"{kind}: {p}:{m.group(3)}"))
                i, routed = j, False
            i += 1
    return sorted(out, reverse=True)


def wirings() -> list:
    """Places outside app.rs that wire the app: assemble an AppState (`AppState::new`,
    `AppState::with_risk`, a struct literal) or call `App::build` (the one way)."""
    pat = re.compile(r"AppState::(new|with_risk)\(|AppState \{|App::build\(")
    out = []
    for p in sorted(list(pathlib.Path("tests").rglob("*.rs")) + list(SRC.rglob("*.rs"))):
        if p == SRC / "app.rs":
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if pat.search(line) and "->" not in line and "fn " not in line:
                out.append(f"{p}:{n}")
    return out


def main():
    mods = files()
    graph = {m: imports(mods, m, strip_tests(p.read_text())) for m, p in mods.items()}
    order = crate_order()
    rank = {name: i for i, name in enumerate(order)}
    name = lambda m: "/".join(m)
    cycles = [[name(m) for m in c] for c in sccs(graph)]
    upward = []
    for m, targets in graph.items():
        for t in targets:
            if m[0] != t[0] and m[0] in rank and t[0] in rank and rank[t[0]] < rank[m[0]]:
                upward.append(f"{name(m)} -> {name(t)}")
    top = {}
    for m, targets in graph.items():
        for t in targets:
            if m[0] != t[0]:
                top.setdefault(m[0], set()).add(t[0])
    top_cycles = [sorted(c) for c in sccs({k: sorted(v) for k, v in top.items()})]
    hs = handlers()
    report = {
        "files": len(mods),
        "cycles": cycles,
        "top_level_cycles": top_cycles,
        "upward": sorted(upward),
        "longest_handlers": [f"{n} {where}" for n, where in hs if "route:" in where][:5],
        "longest_helpers": [f"{n} {where}" for n, where in hs if "helper:" in where][:5],
        "wirings": wirings(),
    }
    if "--json" in sys.argv:
        print(json.dumps(report, indent=2))
        return
    print(f"module files: {report['files']}")
    print(f"file-level cycles: {len(cycles)}")
    for c in cycles:
        print(f"  {len(c)} files: {', '.join(c)}")
    print(f"top-level module cycles: {len(top_cycles)}")
    for c in top_cycles:
        print(f"  {', '.join(c)}")
    print(f"upward imports (against lib.rs's order): {len(upward)}")
    for u in sorted(upward):
        print(f"  {u}")
    print("longest route handlers in src/api (lines):")
    for h in report["longest_handlers"]:
        print(f"  {h}")
    print("longest other async fns in src/api (middleware, helpers):")
    for h in report["longest_helpers"]:
        print(f"  {h}")
    ways = {"App::build" if "App::build" in open(w.split(":")[0]).read().splitlines()[int(w.split(":")[1]) - 1] else w for w in report["wirings"]}
    print(f"ways the app is wired: {len(ways)}; places outside app.rs: {len(report['wirings'])}")
    for w in report["wirings"]:
        print(f"  {w}")


if __name__ == "__main__":
    main()
