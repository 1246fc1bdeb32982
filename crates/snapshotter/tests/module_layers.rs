//! The crate's modules depend on each other one way only: each may use the modules listed
//! before it in [`LAYERS`], never one after it. This reads the sources (comments aside), so a
//! new upward `crate::` reference fails here rather than in a reviewer's head.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Lowest first.
const LAYERS: &[&str] = &[
    "error",
    "cancel",
    "stats",
    "failpoint",
    "layout",
    "writeback",
    "filter",
    "mkfs",
    "config",
    "store",
    "mount",
    "integrity",
    "artifacts",
    "snapshot",
    "diff",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a source file belongs to (`src/NAME.rs` or `src/NAME/...`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

/// `crate::NAME` references outside comments.
fn references(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
            rest = after;
        }
    }
    out
}

#[test]
fn modules_depend_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut upward = Vec::new();
    for f in &files {
        let Some(module) = module_of(&src, f) else {
            continue;
        };
        if module == "lib" {
            continue;
        }
        let Some(from) = rank(&module) else {
            panic!(
                "module {module} ({}) is not in LAYERS: place it",
                f.display()
            );
        };
        for used in references(&std::fs::read_to_string(f).unwrap()) {
            match rank(&used) {
                Some(to) if to > from => upward.push(format!(
                    "{} uses crate::{used}, a higher layer than {module}",
                    f.strip_prefix(&src).unwrap().display()
                )),
                // Re-exports from lib.rs (crate::Error, crate::Result...) are fine.
                _ => {}
            }
        }
    }
    assert!(
        upward.is_empty(),
        "upward dependencies:\n{}",
        upward.join("\n")
    );
}
