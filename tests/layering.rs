//! Keeps the module graph one-way: a module may name (`crate::x`) only modules on a lower layer.
//!
//! The layers, bottom to top (modules on one line are peers and do not use each other):
//!
//! ```text
//!  1  metrics  notify  tls          leaves
//!     group_commit  byte_form  log_writer
//!  2  wire                          HTTP messages: framing, header lines, request and bodies
//!  3  http1  key                    the HTTP/1 protocol driver; request keys
//!  4  config                        the file schema and the validated config
//!  5  admission  balance  coalesce  features, each with its own state and errors
//!     idempotency  buffer  discovery
//!  6  route  upstream               routing; backends, pools and health
//!  6b cluster                       per-key owners across replicas, signed hop markers
//!  7  snapshot                      one config's runtime state
//!  8  proxy                         the request pipeline; the one mapping of errors to responses
//!  9  reload
//! 10  admin
//! 11  server
//! 12  demo                          (then the binary, main.rs)
//! ```
//!
//! Test modules (`#[cfg(test)]` to the end of a file) may use whatever helps them.

use std::path::Path;

const LAYERS: &[&[&str]] = &[
    &[
        "metrics",
        "notify",
        "tls",
        "group_commit",
        "byte_form",
        "log_writer",
    ],
    &["wire"],
    &["http1", "key"],
    &["config"],
    &[
        "admission",
        "balance",
        "coalesce",
        "idempotency",
        "buffer",
        "discovery",
    ],
    &["route", "upstream"],
    &["cluster"],
    &["snapshot"],
    &["proxy"],
    &["reload"],
    &["admin"],
    &["server"],
    &["demo"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level modules a source text names as `crate::x`, outside its test module.
fn named_modules(text: &str) -> Vec<(usize, String)> {
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut named = Vec::new();
    for (number, line) in code.lines().enumerate() {
        let line = line.split("//").next().unwrap_or_default();
        for (at, _) in line.match_indices("crate::") {
            let rest = &line[at + "crate::".len()..];
            let module: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !module.is_empty() {
                named.push((number + 1, module));
            }
        }
    }
    named
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn imports_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut unplaced = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or_default()
            .trim_end_matches(".rs");
        if top == "main" || top == "lib" {
            continue;
        }
        let Some(own) = layer(top) else {
            unplaced.push(top.to_string());
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (line, module) in named_modules(&text) {
            if module == top {
                continue;
            }
            match layer(&module) {
                Some(theirs) if theirs < own => {}
                _ => wrong.push(format!(
                    "src/{}:{line}: `{top}` (layer {}) uses `crate::{module}`",
                    relative.display(),
                    own + 1
                )),
            }
        }
    }
    assert!(
        unplaced.is_empty(),
        "modules missing from LAYERS in tests/layering.rs: {unplaced:?}"
    );
    assert!(
        wrong.is_empty(),
        "imports against the layering (see tests/layering.rs):\n{}",
        wrong.join("\n")
    );
}

/// The checker itself: it sees names in use lines and paths, and skips comments and tests.
#[test]
fn the_checker_finds_names() {
    let text = "use crate::wire::{a, b};\nfn f() { crate::metrics::x(); } // crate::demo\n\
                #[cfg(test)]\nmod tests { use crate::server; }";
    let names: Vec<String> = named_modules(text).into_iter().map(|(_, m)| m).collect();
    assert_eq!(names, ["wire", "metrics"]);
}
