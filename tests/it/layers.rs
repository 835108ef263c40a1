//! The layers of CONTRIBUTING ("Layers"), checked on the sources: a module of `src/` names only
//! modules of layers below its own (`crate::…` outside comments and unit tests), SQL is written
//! only in `store`, and Redis commands are sent only from `queue`, `cache` and the providers'
//! rate limiter. A new import across the layers fails here, not in review.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Lowest first. A module may use the modules of the layers before its own, never one of its
/// own layer or above (so there is no cycle either). `lib.rs` and `main.rs` are the roots.
const LAYERS: &[&[&str]] = &[
    &["domain", "backoff"],
    &["telemetry"],
    &["store", "queue"],
    &["config", "binding", "cache"],
    &["metrics", "engine"],
    &["dead_letters"],
    &[
        "worker",
        "relay",
        "rescuer",
        "projector",
        "scheduler",
        "checkpointer",
        "maintenance",
    ],
    &["channel", "api"],
    &["archive", "ops", "healthcheck"],
    &["app"],
    &["cli"],
];

/// Where SQL may be written.
const SQL_IN: &[&str] = &["store"];
const SQL: &[&str] = &[
    "sqlx::query",
    "query_as(",
    "query_scalar(",
    "query_as_with(",
];

/// Where Redis commands may be sent from (module, or module/file).
const REDIS_IN: &[&str] = &["queue", "cache", "channel/ratelimit.rs"];
const REDIS: &[&str] = &["redis::cmd", "redis::pipe", "redis::Script", ".query_async"];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

pub(crate) fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a source file: without its unit tests (`#[cfg(test)] mod tests` and what
/// follows) and without comments.
pub(crate) fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("//") {
                ""
            } else {
                line.split(" //").next().unwrap_or(line)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a piece of code names through `crate::` (including `crate::{a, b}`).
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `my_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            for (at, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if c.is_whitespace() => {}
                    _ if item_start => {
                        item_start = false;
                        let name = ident(&group[at..]);
                        if !name.is_empty() && name != "self" {
                            out.insert(name);
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn the_reader_finds_plain_and_grouped_paths_but_not_comments() {
    let src = "use crate::store::tasks;\n\
               // use crate::api::Thing;\n\
               let x = crate::queue::Keys::new(\"p\"); // crate::cli\n\
               use crate::{domain::TaskType, metrics::{Metrics, Format}, self};\n\
               use other_crate::x;\n\
               #[cfg(test)]\nmod tests {\n    use crate::app::App;\n}\n";
    assert_eq!(
        named_modules(&code(src)).into_iter().collect::<Vec<_>>(),
        ["domain", "metrics", "queue", "store"]
    );
}

#[test]
fn modules_use_only_lower_layers_sql_stays_in_store_and_redis_in_its_layer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    files.sort();
    assert!(files.len() > 50, "found only {} source files", files.len());

    let mut problems = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&root).unwrap();
        let rel_text = rel.to_string_lossy().replace('\\', "/");
        if rel_text == "lib.rs" || rel_text == "main.rs" {
            continue;
        }
        let module = rel_text
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_owned();
        let Some(layer) = layer_of(&module) else {
            problems.push(format!(
                "{rel_text}: module `{module}` is in no layer (add it to CONTRIBUTING \"Layers\" and this test)"
            ));
            continue;
        };
        let code = code(&std::fs::read_to_string(file).unwrap());
        for used in named_modules(&code) {
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l < layer => {}
                Some(l) => problems.push(format!(
                    "{rel_text}: `{module}` (layer {layer}) uses `crate::{used}` (layer {l}), \
                     which is not below it"
                )),
                None => problems.push(format!(
                    "{rel_text}: uses `crate::{used}`, which is in no layer"
                )),
            }
        }
        let allowed = |places: &[&str]| places.iter().any(|p| *p == module || *p == rel_text);
        if !allowed(SQL_IN) {
            for s in SQL.iter().filter(|s| code.contains(*s)) {
                problems.push(format!("{rel_text}: SQL (`{s}`) outside src/store"));
            }
        }
        if !allowed(REDIS_IN) {
            for s in REDIS.iter().filter(|s| code.contains(*s)) {
                problems.push(format!(
                    "{rel_text}: a Redis command (`{s}`) outside src/queue and src/cache"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
