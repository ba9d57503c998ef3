//! The source tree's own rules, checked on every test run: no file in `src/` over 800 lines
//! (a file that grows a new concern every issue is split by the types its stages hand each
//! other), and every `unsafe` block, impl or fn carries a `// SAFETY:` comment just above it
//! (clippy's `undocumented_unsafe_blocks` checks blocks too; this also covers benches, tests
//! and the fuzz targets, which clippy's run does not build).

use std::path::{Path, PathBuf};

/// Lines a source file in `src/` may have at most.
const FILE_LINES_MAX: usize = 800;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// No file in `src/` is over `FILE_LINES_MAX` lines.
#[test]
fn source_files_stay_small() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut long = Vec::new();
    for file in &files {
        let lines = std::fs::read_to_string(file).unwrap().lines().count();
        let name = file.strip_prefix(root()).unwrap().display().to_string();
        if lines > FILE_LINES_MAX {
            long.push(format!("{name} has {lines} lines"));
        }
    }
    assert!(long.is_empty(), "over {FILE_LINES_MAX} lines: split by concern:\n{}", long.join("\n"));
}

/// Whether the `unsafe` on line `at` is explained: `SAFETY:` on that line or in the comment
/// lines right above it.
fn explained(lines: &[&str], at: usize) -> bool {
    if lines[at].contains("SAFETY:") {
        return true;
    }
    lines[..at]
        .iter()
        .rev()
        .map(|l| l.trim_start())
        .take_while(|l| l.starts_with("//") || l.starts_with("#["))
        .any(|l| l.contains("SAFETY:"))
}

/// Every `unsafe` block, impl and fn in the tree says why it is sound.
#[test]
fn every_unsafe_says_why() {
    let mut files = Vec::new();
    for dir in ["src", "benches", "tests", "fuzz/fuzz_targets"] {
        rust_files(&root().join(dir), &mut files);
    }
    let mut missing = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let is_unsafe = ["unsafe {", "unsafe impl", "unsafe fn"].iter().any(|u| code.contains(u));
            // This file names the keyword in strings.
            if is_unsafe && !code.contains('"') && !explained(&lines, i) {
                missing.push(format!("{}:{}", file.strip_prefix(root()).unwrap().display(), i + 1));
            }
        }
    }
    assert!(missing.is_empty(), "unsafe without a `// SAFETY:` comment above it:\n{}", missing.join("\n"));
}

/// The top-level module (`src/{module}.rs` or `src/{module}/…`) a source file belongs to;
/// `None` for the crate roots, which may use everything.
fn top_module(file: &Path) -> Option<String> {
    let relative = file.strip_prefix(root().join("src")).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// The top-level modules a line of code names through `crate::` paths, grouped ones
/// (`use crate::{a::X, b};`, possibly over several lines) included: `text` is the code from
/// the line on.
fn crate_paths(text: &str) -> Vec<String> {
    let line_end = text.find('\n').unwrap_or(text.len());
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..line_end].find("crate::") {
        let at = from + found;
        from = at + "crate::".len();
        let after = &text[from..];
        if text[..at].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let Some(group) = after.strip_prefix('{') else {
            let ident: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            names.push(ident);
            continue;
        };
        // The first name of every item at the group's own depth.
        let (mut depth, mut item_start, mut ident) = (0usize, true, String::new());
        for c in group.chars() {
            match c {
                '}' if depth == 0 => break,
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                c if item_start && (c.is_alphanumeric() || c == '_') => ident.push(c),
                _ if item_start && !ident.is_empty() => {
                    names.push(std::mem::take(&mut ident));
                    item_start = false;
                }
                _ => {}
            }
        }
        if !ident.is_empty() {
            names.push(ident);
        }
    }
    names.retain(|name| !name.is_empty());
    names
}

/// No two top-level modules import each other: the module graph drawn from `crate::` paths
/// in `src/` has no pair of opposite arrows (a loop of two is where "one place per concern"
/// has broken down; the parsers `config` validates with live in leaves for this reason).
#[test]
fn no_two_modules_import_each_other() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    files.sort();
    // (from, to) → the first line that draws the arrow.
    let mut arrows: std::collections::BTreeMap<(String, String), String> = std::collections::BTreeMap::new();
    for file in &files {
        let Some(from) = top_module(file) else { continue };
        let text = std::fs::read_to_string(file).unwrap();
        let mut offset = 0;
        for (i, line) in text.lines().enumerate() {
            let code = &text[offset..];
            offset += line.len() + 1;
            if line.trim_start().starts_with("//") {
                continue;
            }
            for to in crate_paths(code) {
                if to != from && to != "self" {
                    let place = format!("{}:{}: {}", file.strip_prefix(root()).unwrap().display(), i + 1, line.trim());
                    arrows.entry((from.clone(), to)).or_insert(place);
                }
            }
        }
    }
    let loops: Vec<String> = arrows
        .iter()
        .filter(|((from, to), _)| from < to)
        .filter_map(|((from, to), there)| {
            let back = arrows.get(&(to.clone(), from.clone()))?;
            Some(format!("{from} ⇄ {to}:\n  {there}\n  {back}"))
        })
        .collect();
    assert!(
        loops.is_empty(),
        "top-level modules that import each other (one of the two must not):\n{}",
        loops.join("\n")
    );
}

/// The module-graph scan sees plain and grouped `crate::` paths, and a name that only ends
/// in `crate` is not one.
#[test]
fn crate_paths_are_read_from_grouped_uses() {
    assert_eq!(crate_paths("use crate::config::Config;"), ["config"]);
    assert_eq!(crate_paths("use crate::{\n    config::{A, B},\n    wal::Lsn,\n};"), ["config", "wal"]);
    assert_eq!(crate_paths("let x = my_crate::a(crate::b::c());"), ["b"]);
    assert_eq!(crate_paths("use crate::{apps::Apps, buf};"), ["apps", "buf"]);
}
