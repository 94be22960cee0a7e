//! The layer rule of `src/lib.rs`'s module map holds: every `crate::X` path in a module names a
//! module of a lower rank than its own.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

/// module → rank, from the table in `src/lib.rs`.
fn ranks(lib: &str) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for line in lib.lines() {
        let Some(row) = line.strip_prefix("//! | ") else {
            continue;
        };
        let mut cells = row.split(" | ");
        let Some(rank) = cells.next().and_then(|c| c.trim().parse::<u32>().ok()) else {
            continue;
        };
        for m in cells.next().unwrap_or("").split(',') {
            out.insert(m.trim().trim_matches('`').to_string(), rank);
        }
    }
    out
}

#[test]
fn no_module_uses_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let ranks = ranks(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    assert!(ranks.len() >= 10, "the table in src/lib.rs: {ranks:?}");
    let files = common::walk(&src)
        .into_iter()
        .filter(|(p, _)| p.ends_with(".rs"))
        .map(|(p, _)| src.join(p));
    let mut wrong = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let own = *ranks
            .get(&top)
            .unwrap_or_else(|| panic!("module {top} is not in the table of src/lib.rs"));
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + 7..];
                let used: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if used == top || used.is_empty() {
                    continue;
                }
                match ranks.get(&used) {
                    Some(r) if *r < own => {}
                    _ => wrong.push(format!("{}:{}: {top} uses {used}", rel.display(), n + 1)),
                }
            }
        }
    }
    assert!(wrong.is_empty(), "layer rule broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_table_parses() {
    let r = ranks("//! | 0 | `a`, `b` | x |\n//! | 2 | `c` | y |\n//! |------|---|\n");
    assert_eq!(r.len(), 3);
    assert_eq!(r["b"], 0);
    assert_eq!(r["c"], 2);
}
