//! Personal data sealed per task, so that it can be erased without touching the append-only log
//! (crypto-shredding, README "Audit").
//!
//! Every task gets a random data key. The personal fields of its payload ([`personal_fields`])
//! and its provider results are stored encrypted under that key (AES-256-GCM, each value as an
//! envelope `{"$sealed": "<base64 of nonce ‖ ciphertext ‖ tag>"}`, bound by its associated data
//! to the task and the field), and the hashes of the log cover those envelopes. The data key is
//! stored wrapped (encrypted) under the master key `AUDIT_DATA_KEY`. Erasing a task destroys its
//! data key: the envelopes stay and the chain still verifies, but nobody can open them again,
//! and reads show [`ERASED`].

use super::task::TaskId;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{Map, Value};

use super::payload::TaskType;

/// What reads show in place of a personal field whose task was erased.
pub const ERASED: &str = "[erased]";
/// What reads show in place of a personal field when this process has no `AUDIT_DATA_KEY`.
pub const SEALED: &str = "[sealed]";
/// The key of an envelope.
const ENVELOPE: &str = "$sealed";

/// The fields of `calendar` appointment data that stay readable: identifiers and times, which
/// the cache invalidation needs and which name nobody.
const APPOINTMENT_KEPT: [&str; 5] = [
    "appointment_id",
    "client_id",
    "employee_id",
    "starts_at",
    "ends_at",
];

/// A value that cannot be opened: not an envelope we wrote, or altered.
#[derive(Debug, thiserror::Error)]
#[error("sealed data cannot be opened: {0}")]
pub struct SealError(&'static str);

/// Random bytes from the operating system.
fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .expect("the operating system's random source works");
    out
}

fn aead_key(bytes: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32 bytes make an AES-256 key"))
}

/// `nonce ‖ ciphertext ‖ tag` of `plain` under `key`, bound to `aad`.
fn seal_bytes(key: &LessSafeKey, aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let nonce = random::<NONCE_LEN>();
    let mut buf = plain.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf,
    )
    .expect("AES-GCM seals any buffer of this size");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    out
}

fn open_bytes(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    if sealed.len() < NONCE_LEN {
        return Err(SealError("too short"));
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError("bad nonce"))?;
    let mut buf = body.to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| SealError("wrong key, or altered"))?;
    Ok(plain.to_vec())
}

/// The master key (`AUDIT_DATA_KEY`): wraps the tasks' data keys.
pub struct MasterKey(LessSafeKey);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// Reads 64 hex digits (32 bytes).
    pub fn from_hex(hex_key: &str) -> Result<MasterKey, String> {
        let bytes = hex::decode(hex_key.trim()).map_err(|_| "must be 64 hex digits".to_owned())?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "must be 64 hex digits (32 bytes)".to_owned())?;
        Ok(MasterKey(aead_key(&key)))
    }

    /// A new random master key, as 64 hex digits.
    pub fn generate_hex() -> String {
        hex::encode(random::<32>())
    }

    /// `key` encrypted under this master key, bound to its task.
    pub fn wrap(&self, key: &DataKey, task_id: TaskId) -> Vec<u8> {
        seal_bytes(&self.0, &wrap_aad(task_id), &key.raw)
    }

    /// The data key of `task_id` from its wrapped form.
    pub fn unwrap(&self, wrapped: &[u8], task_id: TaskId) -> Result<DataKey, SealError> {
        let raw: [u8; 32] = open_bytes(&self.0, &wrap_aad(task_id), wrapped)?
            .try_into()
            .map_err(|_| SealError("a data key is 32 bytes"))?;
        Ok(DataKey::from_raw(raw))
    }
}

fn wrap_aad(task_id: TaskId) -> Vec<u8> {
    [b"arnela-data-key:".as_slice(), task_id.as_uuid().as_bytes()].concat()
}

/// One task's data key.
#[derive(Clone)]
pub struct DataKey {
    raw: [u8; 32],
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    pub fn generate() -> DataKey {
        DataKey::from_raw(random())
    }

    fn from_raw(raw: [u8; 32]) -> DataKey {
        DataKey { raw }
    }

    /// The envelope of `value`, bound to the task and to `field` (where it is stored).
    pub fn seal(&self, task_id: TaskId, field: &str, value: &Value) -> Value {
        let plain = serde_json::to_vec(value).expect("JSON serializes");
        let sealed = seal_bytes(&aead_key(&self.raw), &field_aad(task_id, field), &plain);
        let mut env = Map::new();
        env.insert(
            ENVELOPE.into(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(sealed)),
        );
        Value::Object(env)
    }

    /// The value in `envelope` (sealed for `task_id` and `field`).
    pub fn open(&self, task_id: TaskId, field: &str, envelope: &Value) -> Result<Value, SealError> {
        let text = envelope_text(envelope).ok_or(SealError("not an envelope"))?;
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| SealError("not base64"))?;
        let plain = open_bytes(&aead_key(&self.raw), &field_aad(task_id, field), &sealed)?;
        serde_json::from_slice(&plain).map_err(|_| SealError("not JSON"))
    }
}

fn field_aad(task_id: TaskId, field: &str) -> Vec<u8> {
    [
        task_id.as_uuid().as_bytes().as_slice(),
        b":",
        field.as_bytes(),
    ]
    .concat()
}

fn envelope_text(v: &Value) -> Option<&str> {
    match v {
        Value::Object(m) if m.len() == 1 => m.get(ENVELOPE)?.as_str(),
        _ => None,
    }
}

/// Whether `v` is an envelope.
pub fn is_envelope(v: &Value) -> bool {
    envelope_text(v).is_some()
}

/// The top-level personal fields of a payload of `task_type`.
fn personal_top_fields(task_type: TaskType) -> &'static [&'static str] {
    match task_type {
        TaskType::SendEmail => &["to", "subject", "body", "data"],
        TaskType::SendSms | TaskType::SendWhatsapp => &["phone", "message", "data"],
        TaskType::SyncCalendar => &[],
    }
}

/// The personal fields of `appointment_data`: every one but the identifiers and times.
fn personal_appointment_fields(payload: &Value) -> impl Iterator<Item = (&String, &Value)> {
    payload
        .get("appointment_data")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter(|(k, v)| !APPOINTMENT_KEPT.contains(&k.as_str()) && !v.is_null())
}

/// The personal fields of a payload of `task_type`, as paths (`appointment_data.summary`);
/// `appointment_data` holds every field but the identifiers and times in `APPOINTMENT_KEPT`.
pub fn personal_fields(task_type: TaskType, payload: &Value) -> Vec<String> {
    let mut out: Vec<String> = personal_top_fields(task_type)
        .iter()
        .filter(|f| payload.get(**f).is_some_and(|v| !v.is_null()))
        .map(|f| (*f).to_owned())
        .collect();
    if task_type == TaskType::SyncCalendar {
        out.extend(
            personal_appointment_fields(payload).map(|(k, _)| format!("appointment_data.{k}")),
        );
    }
    out
}

fn field_mut<'a>(payload: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    path.split('.').try_fold(payload, |v, part| v.get_mut(part))
}

/// Seals the personal fields of `payload` in place.
pub fn seal_payload(task_type: TaskType, payload: &mut Value, key: &DataKey, task_id: TaskId) {
    for path in personal_fields(task_type, payload) {
        if let Some(v) = field_mut(payload, &path) {
            *v = key.seal(task_id, &path, v);
        }
    }
}

/// Whether any personal field of `payload` is sealed (without allocating: it runs for every
/// claimed task).
pub fn payload_is_sealed(task_type: TaskType, payload: &Value) -> bool {
    personal_top_fields(task_type)
        .iter()
        .any(|f| payload.get(*f).is_some_and(is_envelope))
        || (task_type == TaskType::SyncCalendar
            && personal_appointment_fields(payload).any(|(_, v)| is_envelope(v)))
}

/// How a sealed value is shown when it cannot be opened.
#[derive(Debug, Clone, Copy)]
pub enum Opening<'a> {
    /// With the task's data key.
    Key(&'a DataKey),
    /// The key was destroyed: [`ERASED`].
    Erased,
    /// This process has no master key: [`SEALED`].
    NoMasterKey,
}

fn open_in_place(
    v: &mut Value,
    task_id: TaskId,
    field: &str,
    how: Opening<'_>,
) -> Result<(), SealError> {
    if !is_envelope(v) {
        return Ok(());
    }
    *v = match how {
        Opening::Key(key) => key.open(task_id, field, v)?,
        Opening::Erased => Value::String(ERASED.into()),
        Opening::NoMasterKey => Value::String(SEALED.into()),
    };
    Ok(())
}

/// Opens the sealed personal fields of `payload` in place.
pub fn open_payload(
    task_type: TaskType,
    payload: &mut Value,
    task_id: TaskId,
    how: Opening<'_>,
) -> Result<(), SealError> {
    for path in personal_fields(task_type, payload) {
        if let Some(v) = field_mut(payload, &path) {
            open_in_place(v, task_id, &path, how)?;
        }
    }
    Ok(())
}

/// The field name provider results are sealed under.
pub const RESULT_FIELD: &str = "result";

/// Opens a sealed provider result in place.
pub fn open_result(result: &mut Value, task_id: TaskId, how: Opening<'_>) -> Result<(), SealError> {
    open_in_place(result, task_id, RESULT_FIELD, how)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn personal_fields_are_sealed_and_opened_and_the_rest_stays_readable() {
        let id = TaskId::new();
        let key = DataKey::generate();
        let plain = json!({"event_id": "evt-1", "action": "create", "appointment_data": {
            "appointment_id": "a-1", "starts_at": "2030-01-01T10:00:00Z",
            "summary": "Ana Pérez, fisioterapia", "attendees": ["ana@example.com"]}});
        let mut stored = plain.clone();
        seal_payload(TaskType::SyncCalendar, &mut stored, &key, id);
        let text = stored.to_string();
        assert!(!text.contains("Ana") && !text.contains("ana@"), "{text}");
        assert_eq!(stored["appointment_data"]["appointment_id"], json!("a-1"));
        assert_eq!(stored["event_id"], json!("evt-1"));
        assert!(payload_is_sealed(TaskType::SyncCalendar, &stored));
        let mut opened = stored.clone();
        open_payload(TaskType::SyncCalendar, &mut opened, id, Opening::Key(&key)).unwrap();
        assert_eq!(opened, plain);
        let mut erased = stored.clone();
        open_payload(TaskType::SyncCalendar, &mut erased, id, Opening::Erased).unwrap();
        assert_eq!(erased["appointment_data"]["summary"], json!(ERASED));
        assert_eq!(erased["appointment_data"]["attendees"], json!(ERASED));
        // bound to the task and the field: another task's key, or a value moved, does not open
        let mut other = stored.clone();
        assert!(open_payload(
            TaskType::SyncCalendar,
            &mut other,
            TaskId::new(),
            Opening::Key(&key)
        )
        .is_err());
        let mut swapped = stored.clone();
        swapped["appointment_data"]["summary"] = stored["appointment_data"]["attendees"].clone();
        assert!(
            open_payload(TaskType::SyncCalendar, &mut swapped, id, Opening::Key(&key)).is_err()
        );
    }

    #[test]
    fn a_data_key_is_wrapped_for_its_task_only() {
        let master = MasterKey::from_hex(&MasterKey::generate_hex()).unwrap();
        let key = DataKey::generate();
        let id = TaskId::new();
        let wrapped = master.wrap(&key, id);
        let sealed = key.seal(id, "phone", &json!("+34600000000"));
        let unwrapped = master.unwrap(&wrapped, id).unwrap();
        assert_eq!(
            unwrapped.open(id, "phone", &sealed).unwrap(),
            json!("+34600000000")
        );
        assert!(master.unwrap(&wrapped, TaskId::new()).is_err());
        let stranger = MasterKey::from_hex(&"ab".repeat(32)).unwrap();
        assert!(stranger.unwrap(&wrapped, id).is_err());
        assert!(MasterKey::from_hex("abc").is_err());
    }
}
