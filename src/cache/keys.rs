//! The cache keys the clinic's code already uses, with the same strings. Ids are UUIDs or
//! strings (the system this replaces took integers while every id is a UUID).

use std::fmt::Display;

pub fn client(id: impl Display) -> String {
    format!("client:{id}")
}

pub fn clients_list() -> String {
    "clients:list".to_owned()
}

pub fn employee(id: impl Display) -> String {
    format!("employee:{id}")
}

pub fn employees_list() -> String {
    "employees:list".to_owned()
}

pub fn employees_by_specialty(specialty: &str) -> String {
    format!("employees:specialty:{specialty}")
}

pub fn appointment(id: impl Display) -> String {
    format!("appointment:{id}")
}

pub fn client_appointments(client_id: impl Display) -> String {
    format!("appointments:client:{client_id}")
}

/// `date` as `YYYY-MM-DD`.
pub fn employee_appointments(employee_id: impl Display, date: chrono::NaiveDate) -> String {
    format!(
        "appointments:employee:{employee_id}:date:{}",
        date.format("%Y-%m-%d")
    )
}

pub fn dashboard_stats() -> String {
    "stats:dashboard".to_owned()
}

/// The API's cached view of a task (`GET /tasks/{id}`).
pub fn task(id: impl Display) -> String {
    format!("task:{id}")
}

/// The API's task statistics (`GET /stats`).
pub fn task_stats() -> String {
    "stats:tasks".to_owned()
}

/// The key families a task may name in a glob pattern (`appointments:client:42:*`): the
/// clinic's cached reads, never the API's own views (`task:`, `stats:tasks`).
pub const PATTERN_FAMILIES: [&str; 9] = [
    "appointments:employee:",
    "appointments:client:",
    "employees:specialty:",
    "employees:list",
    "clients:list",
    "stats:dashboard",
    "appointment:",
    "employee:",
    "client:",
];

/// The declared family a pattern starts with, if any.
pub fn pattern_family(pattern: &str) -> Option<&'static str> {
    PATTERN_FAMILIES
        .into_iter()
        .find(|f| pattern.starts_with(f))
}

/// One element of a glob.
enum Glob {
    /// `*`
    Any,
    /// `?`
    One,
    /// `[...]`: the characters and ranges, negated or not.
    Class(Vec<(char, char)>, bool),
    Char(char),
}

fn parse_glob(pattern: &str) -> Vec<Glob> {
    let p: Vec<char> = pattern.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '*' => out.push(Glob::Any),
            '?' => out.push(Glob::One),
            '\\' if i + 1 < p.len() => {
                i += 1;
                out.push(Glob::Char(p[i]));
            }
            '[' if p[i + 1..].contains(&']') => {
                i += 1;
                let negate = p[i] == '^';
                if negate {
                    i += 1;
                }
                let mut ranges = Vec::new();
                while p[i] != ']' {
                    if p[i] == '\\' && p[i + 1] != ']' {
                        i += 1;
                        ranges.push((p[i], p[i]));
                    } else if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
                        let (a, b) = (p[i], p[i + 2]);
                        ranges.push((a.min(b), a.max(b)));
                        i += 2;
                    } else {
                        ranges.push((p[i], p[i]));
                    }
                    i += 1;
                }
                out.push(Glob::Class(ranges, negate));
            }
            c => out.push(Glob::Char(c)),
        }
        i += 1;
    }
    out
}

/// Whether `key` matches the Redis glob `pattern` (`*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\x`),
/// as `SCAN ... MATCH` would decide. Linear in the key for each star: no pattern can make it
/// backtrack exponentially.
pub fn glob_matches(pattern: &str, key: &str) -> bool {
    let p = parse_glob(pattern);
    let k: Vec<char> = key.chars().collect();
    let one = |g: &Glob, c: char| match g {
        Glob::One => true,
        Glob::Char(x) => *x == c,
        Glob::Class(ranges, negate) => {
            ranges.iter().any(|(a, b)| (*a..=*b).contains(&c)) != *negate
        }
        Glob::Any => false,
    };
    let (mut pi, mut ki) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ki < k.len() {
        if pi < p.len() && matches!(p[pi], Glob::Any) {
            star = Some((pi, ki));
            pi += 1;
        } else if pi < p.len() && one(&p[pi], k[ki]) {
            pi += 1;
            ki += 1;
        } else if let Some((sp, sk)) = star {
            pi = sp + 1;
            ki = sk + 1;
            star = Some((sp, sk + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|g| matches!(g, Glob::Any))
}

/// The bounded metric label of a key: its family (`client`, `appointments:employee`, ...).
pub fn family(key: &str) -> &'static str {
    const FAMILIES: [&str; 11] = [
        "appointments:employee",
        "appointments:client",
        "employees:specialty",
        "employees:list",
        "clients:list",
        "stats:dashboard",
        "stats:tasks",
        "appointment",
        "task",
        "employee",
        "client",
    ];
    FAMILIES
        .into_iter()
        .find(|f| key.starts_with(f))
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn globs_match_as_redis_does() {
        for (p, k, m) in [
            ("client:*", "client:42", true),
            ("client:*", "clients:list", false),
            ("appointments:client:4?", "appointments:client:42", true),
            ("appointments:client:4?", "appointments:client:4", false),
            ("employee:[ab]*", "employee:b7", true),
            ("employee:[^ab]*", "employee:b7", false),
            ("employee:[0-9]", "employee:5", true),
            ("client:\\*", "client:*", true),
            ("client:\\*", "client:1", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ] {
            assert_eq!(glob_matches(p, k), m, "{p} ~ {k}");
        }
        // no exponential backtracking: this returns at once
        let key = "a".repeat(200);
        assert!(!glob_matches(&format!("{}b", "a*".repeat(30)), &key));
    }

    #[test]
    fn patterns_must_start_with_a_clinic_family() {
        assert_eq!(
            pattern_family("appointments:client:42:*"),
            Some("appointments:client:")
        );
        assert_eq!(pattern_family("task:*"), None);
        assert_eq!(pattern_family("cli*"), None);
    }

    #[test]
    fn keys_have_the_strings_users_know() {
        let id = Uuid::nil();
        assert_eq!(client(id), format!("client:{id}"));
        assert_eq!(client("123"), "client:123");
        assert_eq!(clients_list(), "clients:list");
        assert_eq!(employee(456), "employee:456");
        assert_eq!(employees_list(), "employees:list");
        assert_eq!(
            employees_by_specialty("physio"),
            "employees:specialty:physio"
        );
        assert_eq!(appointment(789), "appointment:789");
        assert_eq!(client_appointments(123), "appointments:client:123");
        let day = chrono::NaiveDate::from_ymd_opt(2024, 1, 15).unwrap();
        assert_eq!(
            employee_appointments(456, day),
            "appointments:employee:456:date:2024-01-15"
        );
        assert_eq!(dashboard_stats(), "stats:dashboard");
    }

    #[test]
    fn families_are_bounded_labels() {
        assert_eq!(
            family("appointments:employee:1:date:2024-01-15"),
            "appointments:employee"
        );
        assert_eq!(family("appointment:9"), "appointment");
        assert_eq!(family("client:7"), "client");
        assert_eq!(family("task:1"), "task");
        assert_eq!(family("stats:tasks"), "stats:tasks");
        assert_eq!(family("whatever"), "other");
    }
}
