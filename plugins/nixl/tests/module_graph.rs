//! The crate's modules form a DAG: no module reaches one that reaches it
//! back through `crate::` paths (link.rs and engine.rs once imported each other).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut g = BTreeMap::new();
    for f in std::fs::read_dir(dir).unwrap() {
        let path = f.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let deps = text
            .split("crate::")
            .skip(1)
            .map(|s| {
                s.chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            })
            .map(String::from_iter)
            .filter(|d| !d.is_empty() && *d != name)
            .collect();
        g.insert(name, deps);
    }
    g
}

#[test]
fn no_two_modules_import_each_other() {
    let g = graph();
    assert!(g.len() > 5, "{g:?}");
    // Kahn's algorithm: what cannot be ordered sits on a cycle.
    let mut left = g.clone();
    while let Some(leaf) = left
        .iter()
        .find(|(_, deps)| deps.iter().all(|d| !left.contains_key(d)))
        .map(|(m, _)| m.clone())
    {
        left.remove(&leaf);
    }
    assert!(left.is_empty(), "modules on an import cycle: {left:?}");
}
