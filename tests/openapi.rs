//! The committed OpenAPI document is what the code produces, and documents every operation's
//! statuses.

use serde_json::Value;

const COMMITTED: &str = "openapi/openapi.json";

#[test]
fn the_committed_spec_matches_the_code() {
    let produced = arnela::api::spec_json();
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed.trim_end() == produced.trim_end(),
        "{COMMITTED} is out of date; regenerate it with \
         `cargo run --quiet -- openapi --output {COMMITTED}` and commit it"
    );
}

#[test]
fn every_operation_documents_its_statuses() {
    let spec: Value = serde_json::from_str(&arnela::api::spec_json()).unwrap();
    let paths = spec["paths"].as_object().unwrap();
    let expect: &[(&str, &str, &[&str])] = &[
        (
            "/tasks",
            "post",
            &[
                "200", "201", "400", "401", "403", "409", "413", "415", "422", "500", "503",
            ],
        ),
        (
            "/tasks/batch",
            "post",
            &[
                "200", "201", "400", "401", "403", "409", "413", "415", "422", "500", "503",
            ],
        ),
        (
            "/tasks",
            "get",
            &["200", "400", "401", "403", "422", "500", "503"],
        ),
        (
            "/tasks/{id}",
            "get",
            &["200", "400", "401", "403", "404", "500", "503"],
        ),
        (
            "/tasks/{id}/events",
            "get",
            &["200", "400", "401", "403", "404", "500", "503"],
        ),
        (
            "/tasks/{id}/retry",
            "post",
            &[
                "200", "400", "401", "403", "404", "409", "422", "500", "503",
            ],
        ),
        (
            "/tasks/{id}/cancel",
            "post",
            &[
                "200", "400", "401", "403", "404", "409", "422", "500", "503",
            ],
        ),
        (
            "/events",
            "get",
            &["200", "400", "401", "403", "422", "500", "503"],
        ),
        ("/stats", "get", &["200", "401", "403", "500", "503"]),
        ("/health", "get", &["200", "401", "403", "503"]),
        ("/health/ready", "get", &["200", "503"]),
        ("/health/live", "get", &["200"]),
        ("/metrics", "get", &["200", "401", "403"]),
    ];
    for (path, method, statuses) in expect {
        let responses = spec["paths"][path][method]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path} is missing"));
        for s in *statuses {
            assert!(
                responses.contains_key(*s),
                "{method} {path} does not document {s}"
            );
        }
    }
    let operations: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(
        operations,
        expect.len(),
        "an operation is not covered by this test"
    );
}
