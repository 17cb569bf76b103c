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

/// The code of a file: comments and string literals removed, and the inline `mod tests`
/// cut out.
fn code_of(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == 'r'
            && (at(i + 1) == '#' || at(i + 1) == '"')
            && !ident(at(i.wrapping_sub(1)))
        {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            if at(j) != '"' {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (1..=hashes).all(|k| at(j + k) == '#') {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && at(i + 1) == '\\' {
            // A char literal with an escape: '\n', '\'', '\u{1f}'.
            i += 2;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if c == '\'' && at(i + 2) == '\'' {
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    // The unit tests: from their attribute to the brace that closes them.
    if let Some(start) = out.find("#[cfg(test)]\nmod tests {") {
        let open = start + out[start..].find('{').unwrap();
        let mut depth = 0;
        let mut end = out.len();
        for (k, ch) in out[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.replace_range(start..end, "");
    }
    out
}

fn ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path in `code` with at least two segments, `use` groups expanded:
/// `crate::a::{b, c::{d}}` gives `crate::a::b` and `crate::a::c::d`.
fn paths(code: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = ident(chars[i])
            && !chars[i].is_ascii_digit()
            && (i == 0 || (!ident(chars[i - 1]) && chars[i - 1] != ':'));
        if starts {
            let (trees, end) = tree(&chars, i);
            out.extend(trees.into_iter().filter(|p| p.len() >= 2));
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// One path (or `use` tree) starting at `i`: its expansions and where it ends.
fn tree(chars: &[char], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let skip_ws = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let mut prefix = Vec::new();
    loop {
        i = skip_ws(i);
        if chars.get(i) == Some(&'{') {
            let mut all = Vec::new();
            i += 1;
            loop {
                i = skip_ws(i);
                match chars.get(i) {
                    None => return (all, i),
                    Some('}') => return (all, i + 1),
                    Some(',') => i += 1,
                    Some(_) => {
                        let (subs, end) = tree(chars, i);
                        for sub in subs {
                            let mut p = prefix.clone();
                            p.extend(sub.into_iter().filter(|s| s != "self"));
                            all.push(p);
                        }
                        // Skip an `as` rename or a `*` up to the next separator.
                        i = end;
                        while i < chars.len() && !matches!(chars[i], ',' | '}') {
                            i += 1;
                        }
                    }
                }
            }
        }
        let start = i;
        while i < chars.len() && ident(chars[i]) {
            i += 1;
        }
        if i == start {
            return (vec![prefix], i);
        }
        let segment: String = chars[start..i].iter().collect();
        if segment != "self" || prefix.is_empty() {
            prefix.push(segment);
        }
        if chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':') {
            i += 2;
        } else {
            return (vec![prefix], i);
        }
    }
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

/// Which modules each module imports, itself excluded: paths from `crate`, `super` (any number
/// of them), `self`, or a child module's name.
fn imports(known: &BTreeMap<String, Module>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for (path, module) in known {
        let mut to = BTreeSet::new();
        for segments in paths(&module.code) {
            let mut base = path.clone();
            let mut rest: &[String] = &segments;
            match segments[0].as_str() {
                "crate" => {
                    base.clear();
                    rest = &segments[1..];
                }
                "self" => rest = &segments[1..],
                "super" => {
                    while rest.first().is_some_and(|s| s == "super") {
                        base = parent(&base).to_owned();
                        rest = &rest[1..];
                    }
                }
                child if known.contains_key(&join(path, child)) => {}
                // Another crate, or an item of this module.
                _ => continue,
            }
            let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
            to.insert(resolve(known, &base, &rest));
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

#[test]
fn the_parser_expands_groups_and_skips_comments_and_strings() {
    let code = code_of(
        "use crate::a::{b, c::{d, e as f}, self};\n// crate::x::y\nlet s = \"crate::q::r\";\n\
         /* super::z */ let v = super::super::w::V; inner::K;\n\
         #[cfg(test)]\nmod tests {\n    use crate::t::u;\n}\n",
    );
    let found: Vec<String> = paths(&code).iter().map(|p| p.join("::")).collect();
    assert_eq!(
        found,
        [
            "crate::a::b",
            "crate::a::c::d",
            "crate::a::c::e",
            "crate::a",
            "super::super::w::V",
            "inner::K"
        ]
    );
}
