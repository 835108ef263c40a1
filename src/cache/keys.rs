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
