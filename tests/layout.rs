//! The crate's layout, checked from its sources: each file one concept of bounded size, modules
//! whose imports run one way (no module imports one that imports it back, directly or through
//! others), a connection layer that knows nothing of the store, a server that does not depend
//! on the client, and a `lib.rs` that lists every module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines a file under `src/` may have.
const MAX_LINES: usize = 700;

/// A module of the library: its path (`store::redis::writer`) and its code, without comments
/// and without the unit tests at its end.
struct Module {
    file: PathBuf,
    code: String,
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/store/redis/mod.rs` → `store::redis`; `src/lib.rs` → ``.
fn module_path(file: &Path) -> String {
    let rel = file.strip_prefix(src()).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts.join("::")
}

/// The code of a file: comments removed, and the inline `mod tests` at its end cut off.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("//") {
                ""
            } else {
                match line.find(" // ") {
                    Some(at) => &line[..at],
                    None => line,
                }
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn modules() -> BTreeMap<String, Module> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files
        .into_iter()
        // The binary is not part of the library's module tree.
        .filter(|f| f.file_name().is_some_and(|n| n != "main.rs"))
        .map(|file| {
            let text = std::fs::read_to_string(&file).unwrap();
            let module = Module {
                code: code_of(&text),
                file,
            };
            (module_path(&module.file), module)
        })
        // Test-only modules may reach into whatever they test.
        .filter(|(path, _)| !path.ends_with("tests"))
        .collect()
}

fn parent(path: &str) -> &str {
    path.rsplit_once("::").map_or("", |(p, _)| p)
}

fn join(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_owned()
    } else {
        format!("{base}::{name}")
    }
}

/// The deepest module that `base::rest...` names: an item path ends at its module.
fn resolve(known: &BTreeMap<String, Module>, base: &str, rest: &[&str]) -> String {
    let mut at = base.to_owned();
    for part in rest {
        let next = join(&at, part);
        if known.contains_key(&next) {
            at = next;
        } else {
            break;
        }
    }
    at
}

/// The identifiers of a path after `crate::` or `super::`, and of each member of a `{...}`
/// group that follows it.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| ident(c) || c == ':') {
            continue;
        }
        let mut parts = Vec::new();
        let mut tail = rest;
        loop {
            let end = tail.find(|c: char| !ident(c)).unwrap_or(tail.len());
            if end == 0 {
                break;
            }
            parts.push(tail[..end].to_owned());
            tail = &tail[end..];
            match tail.strip_prefix("::") {
                Some(t) => tail = t,
                None => break,
            }
        }
        if let Some(group) = tail.strip_prefix('{') {
            let close = group.find('}').unwrap_or(group.len());
            for member in group[..close].split(',') {
                let first = member
                    .trim()
                    .split("::")
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .next()
                    .unwrap_or("");
                if !first.is_empty() && first != "self" && first != "*" {
                    let mut p = parts.clone();
                    p.push(first.to_owned());
                    out.push(p);
                }
            }
        }
        out.push(parts);
    }
    out
}

/// Which modules each module imports (by `crate::` and `super::` paths), itself excluded.
fn imports(known: &BTreeMap<String, Module>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for (path, module) in known {
        let mut to = BTreeSet::new();
        for parts in paths_after(&module.code, "crate::") {
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            to.insert(resolve(known, "", &parts));
        }
        // `super` of a `mod.rs` or a leaf file is the enclosing module.
        for parts in paths_after(&module.code, "super::") {
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            to.insert(resolve(known, parent(path), &parts));
        }
        to.remove(path);
        // The crate root only declares modules and the generated protos.
        to.remove("");
        graph.insert(path.clone(), to);
    }
    graph
}

/// A cycle in the graph, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|n| n == next).unwrap();
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(cycle) = visit(next, graph, state, stack) {
                        return Some(cycle);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(cycle) = visit(node, graph, &mut state, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

/// Whether `path` is `root` or inside it.
fn within(path: &str, root: &str) -> bool {
    path == root || path.starts_with(&format!("{root}::"))
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = imports(&modules());
    assert!(
        graph
            .get("store::redis")
            .is_some_and(|to| to.contains("shard")),
        "the import graph is read from the sources: {graph:#?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("modules import each other: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_connection_layer_imports_neither_the_store_nor_the_events() {
    let graph = imports(&modules());
    for (from, to) in graph.iter().filter(|(from, _)| within(from, "shard")) {
        for target in to {
            assert!(
                !within(target, "store") && !within(target, "events"),
                "{from} imports {target}"
            );
        }
    }
}

#[test]
fn the_server_does_not_import_the_client() {
    let graph = imports(&modules());
    let server = &graph["server"];
    assert!(!server.contains("client"), "server imports {server:?}");
    assert!(!graph["service::framing"].contains("client"));
}

#[test]
fn no_file_is_longer_than_the_limit() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).unwrap().lines().count();
            (lines > MAX_LINES).then(|| format!("{} ({lines} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:?}");
}

#[test]
fn lib_lists_every_module_on_one_line() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
        .map(str::to_owned)
        .collect();
    let doc: Vec<&str> = lib.lines().filter(|l| l.starts_with("//!")).collect();
    let start = doc
        .iter()
        .position(|l| *l == "//! # Layout")
        .expect("a Layout section");
    let section: Vec<&str> = doc[start + 1..]
        .iter()
        .copied()
        .take_while(|l| !l.starts_with("//! #"))
        .collect();
    let mut names = BTreeSet::new();
    for (i, line) in section.iter().enumerate() {
        let Some(entry) = line.strip_prefix("//! - ") else {
            let continues = i > 0 && section[i - 1].starts_with("//! - ");
            assert!(
                !(continues && line.trim() != "//!"),
                "a module entry runs onto a second line: {line:?}"
            );
            continue;
        };
        let name = entry
            .strip_prefix("[`")
            .and_then(|l| l.split_once("`]: "))
            .map(|(name, _)| name)
            .unwrap_or_else(|| panic!("not a module entry: {line:?}"));
        assert!(names.insert(name.to_owned()), "{name} listed twice");
    }
    assert_eq!(names, declared, "the Layout lists exactly the modules");
}
