//! The crate's top-level modules depend on each other without a cycle: low pieces (frame,
//! metrics, queue, message, clock, rng, volume) below the stages, the stages below the config,
//! the runner (`pipeline`) above them, the commands on top. Read from the sources: every
//! `crate::NAME` path outside comments and unit-test modules is an edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            rust_files(&e.unwrap().path(), out);
        }
    } else if p.extension().is_some_and(|e| e == "rs") {
        out.push(p.to_path_buf());
    }
}

/// The top-level modules a source names through `crate::NAME` or `crate::{NAME, …}`.
fn named_modules(src: &str) -> BTreeSet<String> {
    let code = src.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
    let mut out = BTreeSet::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        for (i, _) in line.match_indices("crate::") {
            let rest = &line[i + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group.split(',').map(str::trim).collect(),
                None => vec![rest],
            };
            for n in names {
                let ident: String = n.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                if !ident.is_empty() {
                    out.insert(ident);
                }
            }
        }
    }
    out
}

/// Edges `module → modules it names` among the top-level modules of `src/`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeMap::new();
    for e in std::fs::read_dir(&root).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if name != "main" && name != "lib" && (p.is_dir() || p.extension().is_some_and(|e| e == "rs")) {
            modules.insert(name, p);
        }
    }
    let mut graph = BTreeMap::new();
    for (name, path) in &modules {
        let mut files = Vec::new();
        rust_files(path, &mut files);
        let mut deps = BTreeSet::new();
        for f in files {
            let src = std::fs::read_to_string(&f).unwrap();
            deps.extend(named_modules(&src).into_iter().filter(|d| d != name && modules.contains_key(d)));
        }
        graph.insert(name.clone(), deps);
    }
    graph
}

/// A cycle through `start`, if any (depth-first search back to it).
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        g: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in &g[at] {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(graph, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn the_top_level_modules_have_no_cycle() {
    let graph = module_graph();
    // The reader sees the edges that are there.
    assert!(graph["pipeline"].contains("ingest") && graph["calibrate"].contains("decode"), "{graph:#?}");
    let cycles: Vec<String> =
        graph.keys().filter_map(|m| cycle_through(&graph, m)).map(|c| c.join(" → ")).collect();
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}

/// The modules of the stages and of what only they use.
const STAGE_MODULES: [&str; 5] = ["motion", "glm", "decode", "calibrate", "sim"];

#[test]
fn the_runner_knows_no_stage_outside_its_topology() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root.join("pipeline"), &mut files);
    assert!(files.len() >= 3, "{files:?}");
    let mut found = Vec::new();
    for f in files.iter().filter(|f| f.file_name().is_some_and(|n| n != "resolve.rs")) {
        let names = named_modules(&std::fs::read_to_string(f).unwrap());
        found.extend(
            names
                .into_iter()
                .filter(|n| STAGE_MODULES.contains(&n.as_str()))
                .map(|n| format!("{}: {n}", f.display())),
        );
    }
    assert!(
        found.is_empty(),
        "the runner names stage modules outside pipeline/resolve.rs:\n{}",
        found.join("\n")
    );
    // The topology file is where they are named.
    let topology = named_modules(&std::fs::read_to_string(root.join("pipeline/resolve.rs")).unwrap());
    assert!(STAGE_MODULES.iter().all(|m| topology.contains(*m)), "{topology:?}");
}

#[test]
fn the_topic_schema_depends_on_no_stage_or_sink() {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/topic.rs")).unwrap();
    let names = named_modules(&src);
    let allowed = ["frame", "message", "queue", "volume"];
    let extra: Vec<&String> = names.iter().filter(|n| !allowed.contains(&n.as_str())).collect();
    assert!(extra.is_empty(), "topic.rs names {extra:?}");
}

#[test]
fn the_reader_finds_grouped_and_plain_paths_and_skips_comments_and_tests() {
    let src =
        "use crate::a::X;\nuse crate::{b::Y, c};\n// crate::d\n/// crate::e\nfn f() { crate::g::h(); }\n\
               #[cfg(test)]\nmod tests {\n    use crate::t;\n}\n";
    let names: Vec<String> = named_modules(src).into_iter().collect();
    assert_eq!(names, ["a", "b", "c", "g"]);
}

#[test]
fn a_cycle_is_found_and_a_chain_is_not() {
    let g = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    let chain = g(&[("a", "b"), ("b", "c"), ("a", "c")]);
    assert!(chain.keys().all(|m| cycle_through(&chain, m).is_none()));
    let knot = g(&[("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]);
    assert_eq!(cycle_through(&knot, "a").unwrap(), ["a", "b", "c", "a"]);
    assert!(cycle_through(&knot, "d").is_none());
}
