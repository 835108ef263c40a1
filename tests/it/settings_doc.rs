//! Every setting is declared once, in `src/config/variables.rs` (clap declarations with `env`),
//! and what shows it cannot drift from it: README's two settings tables are generated from the
//! declarations, every variable name the settings code writes is declared, `.env.example` sets
//! only declared variables, and the compose stack forwards every setting to the service.

use arnela::config::variables;
use std::collections::BTreeSet;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Variables of the compose stack itself (its database roles, ports and project), not the
/// service's.
const COMPOSE_ONLY: &[&str] = &[
    "APP_BIND_ADDRESS",
    "COMPOSE_PROJECT_NAME",
    "DB_OWNER_USER",
    "DB_OWNER_PASSWORD",
    "DB_SUPERUSER",
    "DB_SUPERUSER_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
    "GRAFANA_PORT",
];

/// Settings the compose stack sets another way: the URLs (it gives the parts, so a host-side URL
/// in `.env` cannot override them) and the owner's role, which only the `migrate` service gets
/// (from `DB_OWNER_USER` / `DB_OWNER_PASSWORD`).
const NOT_FORWARDED: &[&str] = &[
    "DATABASE_URL",
    "REDIS_URL",
    "DB_MIGRATION_USER",
    "DB_MIGRATION_PASSWORD",
];

/// The string literals of a piece of Rust that look like variable names (`"DB_HOST"`), outside
/// comments and unit tests (as [`crate::layers::code`] reads it).
fn literal_names(source: &str, with_underscore: bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in crate::layers::code(source).lines() {
        for (i, part) in line.split('"').enumerate() {
            let looks_like_a_variable = i % 2 == 1
                && (part.contains('_') || !with_underscore)
                && part.len() > 3
                && part.starts_with(|c: char| c.is_ascii_uppercase())
                && part
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if looks_like_a_variable {
                out.insert(part.to_owned());
            }
        }
    }
    out
}

/// The generated table between its README markers.
fn readme_table(readme: &str, name: &str) -> String {
    let start = format!("<!-- settings table \"{name}\": generated from src/config/variables.rs");
    let at = readme
        .find(&start)
        .unwrap_or_else(|| panic!("README has no marker for the {name:?} table"));
    let body = &readme[at..];
    let body = &body[body.find('\n').unwrap() + 1..];
    let end = body
        .find("<!-- end of settings table -->")
        .unwrap_or_else(|| panic!("the {name:?} table has no end marker"));
    body[..end].to_owned()
}

#[test]
fn readme_settings_tables_are_the_declarations() {
    let readme = read("README.md");
    for (name, generated) in [
        ("service", variables::service_table()),
        ("channels", variables::channels_table()),
    ] {
        let written = readme_table(&readme, name);
        assert!(
            written == generated,
            "README's {name:?} settings table differs from src/config/variables.rs; \
             paste this between its markers:\n{generated}"
        );
    }
}

#[test]
fn every_variable_the_code_names_is_declared() {
    let documented = documented();
    let mut files = Vec::new();
    crate::layers::sources(&root().join("src"), &mut files);
    let mut named = BTreeSet::new();
    for path in ["src/config/mod.rs", "src/config/channels.rs", "src/main.rs"] {
        named.extend(literal_names(&read(path), true));
    }
    for f in &files {
        let source = std::fs::read_to_string(f).unwrap();
        // Variables read straight from the environment, outside the declarations.
        for line in crate::layers::code(&source).lines() {
            if let Some(at) = line.find("env::var(\"") {
                named.extend(literal_names(&line[at..], false));
            }
        }
    }
    let undeclared: Vec<&String> = named
        .iter()
        .filter(|n| !documented.contains(n.as_str()))
        .collect();
    assert!(
        undeclared.is_empty(),
        "named by the code but declared nowhere in src/config/variables.rs: {undeclared:?}"
    );
}

fn documented() -> BTreeSet<String> {
    variables::documented().into_iter().collect()
}

#[test]
fn env_example_sets_only_documented_variables() {
    let documented = documented();
    let example = read(".env.example");
    let unknown: Vec<&str> = example
        .lines()
        .map(|l| l.trim_start_matches('#').trim())
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .filter(|k| !documented.contains(*k) && !COMPOSE_ONLY.contains(k))
        .collect();
    assert!(
        unknown.is_empty(),
        ".env.example sets variables no row documents: {unknown:?}"
    );
}

/// The keys of the api service's environment in compose.yaml (the `&arnela-environment` map).
fn compose_api_environment(compose: &str) -> BTreeSet<String> {
    let start = compose
        .find("environment: &arnela-environment")
        .expect("compose.yaml's api environment is the anchor &arnela-environment");
    let mut keys = BTreeSet::new();
    for line in compose[start..].lines().skip(1) {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if indent < 6 {
            break;
        }
        if let Some((key, _)) = line.trim().split_once(':') {
            keys.insert(key.to_owned());
        }
    }
    keys
}

#[test]
fn the_compose_stack_forwards_every_setting() {
    let forwarded = compose_api_environment(&read("compose.yaml"));
    assert!(forwarded.len() > 20, "read only {forwarded:?}");
    let documented = documented();
    let missing: Vec<&String> = documented
        .iter()
        .filter(|v| !forwarded.contains(*v) && !NOT_FORWARDED.contains(&v.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "compose.yaml does not forward these settings to the service: {missing:?}"
    );
    let unknown: Vec<&String> = forwarded
        .iter()
        .filter(|k| !documented.contains(*k))
        .collect();
    assert!(
        unknown.is_empty(),
        "compose.yaml sets variables no row documents: {unknown:?}"
    );
}
