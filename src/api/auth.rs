//! Access control: bearer JWTs signed with `JWT_SECRET`, and the role each operation needs.
//!
//! A token carries `{sub, role, iat, exp}`, is signed with HS256 (the only algorithm accepted: a
//! token with `alg: none` or any other algorithm is refused) and must carry an expiry; a few
//! seconds of clock skew ([`LEEWAY_SECS`]) are tolerated. [`Auth`] holds the keys, built once from
//! the secret; `arnela token` mints tokens with it.
//!
//! Every operation except `/health/live` and `/health/ready` takes a [`BearerAuth`] (the OpenAPI
//! security scheme, so Swagger UI at `/docs` offers "Authorize") and names the roles it allows in
//! one line: `auth.require(&[Role::Auditor])?`. An admin may do everything. No token, or one
//! that is malformed, expired or wrongly signed, is a 401 with `WWW-Authenticate: Bearer`; a valid
//! token whose role is not allowed is a 403. Neither response, nor any log line, repeats the token.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use poem::Request;
use poem_openapi::auth::Bearer;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, SecurityScheme};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use super::error::{ErrorBody, ErrorCode, RoleName};
use secrecy::{ExposeSecret, SecretString};

/// Clock skew tolerated when checking `exp`.
pub const LEEWAY_SECS: u64 = 5;

/// The longest lifetime `arnela token` signs.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// The `iss` every token carries and the API requires.
pub const ISSUER: &str = "arnela";
/// The `aud` every token carries and the API requires.
pub const AUDIENCE: &str = "arnela-api";

/// What a token's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Enqueues tasks and reads any task's current state (the appointment system; tasks have no
    /// owner, so a producer token can read every task by id).
    Producer,
    /// Reads tasks, their histories, the event log and the detailed health report.
    Auditor,
    /// Everything, including requeueing and cancelling tasks.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Producer, Role::Auditor, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }

    /// Whether this role may do what `allowed` may do (an admin may do everything).
    pub fn is_allowed(self, allowed: &[Role]) -> bool {
        self == Role::Admin || allowed.contains(&self)
    }

    /// The longest lifetime (`exp - iat`) a token of this role may have: the more it may do,
    /// the shorter.
    pub fn max_ttl(self) -> Duration {
        const DAY: u64 = 24 * 3600;
        Duration::from_secs(match self {
            Role::Producer => 366 * DAY,
            Role::Auditor => 90 * DAY,
            Role::Admin => 7 * DAY,
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a role (expected producer, auditor or admin)"))
    }
}

/// The claims of a token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    /// Who holds the token (recorded as `by` of the operator actions).
    pub sub: String,
    pub role: Role,
    /// Issued at, seconds since the Unix epoch.
    pub iat: i64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: i64,
    /// Not valid before, seconds since the Unix epoch (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Issuer: [`ISSUER`].
    #[serde(default)]
    pub iss: String,
    /// Audience: [`AUDIENCE`].
    #[serde(default)]
    pub aud: String,
    /// The holder may declare glob patterns in `invalidates` (each costs a pass over the cache's
    /// keys); admins always may.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub patterns: bool,
    /// The tenant the holder acts for (several tokens of one clinic system share it); absent:
    /// the subject is the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl Claims {
    /// Who the tasks this token enqueues belong to, and whose tasks a producer token may read.
    pub fn owner(&self) -> &str {
        self.tenant.as_deref().unwrap_or(&self.sub)
    }

    /// Whether the holder may declare invalidation patterns.
    pub fn may_use_patterns(&self) -> bool {
        self.patterns || self.role == Role::Admin
    }
}

/// Why a token cannot be signed or is refused. The messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("JWT_SECRET is not set; it is needed to sign and verify the API's bearer tokens")]
    NoSecret,
    #[error("the token has expired")]
    Expired,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token is not signed with HS256")]
    WrongAlgorithm,
    #[error("the token has no expiry (exp)")]
    NoExpiry,
    #[error("the token is not a well-formed JWT with the claims sub, role, iat, exp, iss and aud")]
    Malformed,
    #[error("the token is not yet valid (nbf)")]
    NotYetValid,
    #[error("the token's issuer or audience is not this API's")]
    WrongIssuerOrAudience,
    #[error("the token's key id is not one of the accepted keys")]
    UnknownKey,
    #[error("the token's lifetime is longer than its role allows")]
    TooLong,
}

impl AuthError {
    fn from_jwt(e: jsonwebtoken::errors::Error) -> AuthError {
        use jsonwebtoken::errors::ErrorKind;
        match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                AuthError::WrongAlgorithm
            }
            ErrorKind::MissingRequiredClaim(c) if c == "exp" => AuthError::NoExpiry,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => {
                AuthError::WrongIssuerOrAudience
            }
            _ => AuthError::Malformed,
        }
    }
}

/// One accepted secret: its key id (a fingerprint of the secret, so it names the key without
/// revealing it) and its keys.
struct Key {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Key {
    /// The keys of a secret; `None` for an empty one.
    fn new(secret: &SecretString) -> Option<Key> {
        use sha2::{Digest, Sha256};
        let bytes = secret.expose_secret().as_bytes();
        let digest = Sha256::new()
            .chain_update(b"arnela-jwt-kid:")
            .chain_update(bytes)
            .finalize();
        Some(Key {
            kid: hex::encode(&digest[..8]),
            encoding: EncodingKey::from_secret(bytes).ok()?,
            decoding: DecodingKey::from_secret(bytes).ok()?,
        })
    }
}

struct Keys {
    /// Signs; accepted.
    current: Key,
    /// Still accepted while tokens signed with them are rolled (`JWT_PREVIOUS_SECRETS`).
    previous: Vec<Key>,
    validation: Validation,
}

/// Signs and verifies tokens. Cheap to clone; the keys are built once.
#[derive(Clone)]
pub struct Auth {
    keys: Arc<Keys>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Auth(***)")
    }
}

impl Auth {
    /// Keys from the secret; an empty secret is refused (anyone could sign with it).
    pub fn new(secret: &SecretString) -> Result<Auth, AuthError> {
        Auth::rotating(secret, &[])
    }

    /// Signs with `current` and also accepts tokens signed with any of `previous`: a secret is
    /// rotated by making it previous, rolling the tokens, then dropping it.
    pub fn rotating(current: &SecretString, previous: &[SecretString]) -> Result<Auth, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        let current = Key::new(current).ok_or(AuthError::NoSecret)?;
        let previous = previous
            .iter()
            .map(Key::new)
            .collect::<Option<Vec<Key>>>()
            .ok_or(AuthError::NoSecret)?;
        Ok(Auth {
            keys: Arc::new(Keys {
                current,
                previous,
                validation,
            }),
        })
    }

    /// A token for `subject` with `role`, valid for `ttl` from now.
    pub fn mint(&self, role: Role, ttl: Duration, subject: &str) -> String {
        self.mint_for(role, ttl, subject, None)
    }

    /// A token acting for `tenant` (see [`Claims::tenant`]).
    pub fn mint_for(
        &self,
        role: Role,
        ttl: Duration,
        subject: &str,
        tenant: Option<&str>,
    ) -> String {
        self.sign(&claims_for(role, ttl, subject, tenant, false))
    }

    /// A token as [`Auth::mint_for`] that may also declare invalidation patterns.
    pub fn mint_with_patterns(
        &self,
        role: Role,
        ttl: Duration,
        subject: &str,
        tenant: Option<&str>,
    ) -> String {
        self.sign(&claims_for(role, ttl, subject, tenant, true))
    }

    /// Signs the given claims as they are (tests use it for expired tokens), with the current
    /// key's id in the header.
    pub fn sign(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.keys.current.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.keys.current.encoding)
            // Serialising these claims cannot fail and an HMAC key signs any input.
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// The claims of a valid token: signed with HS256 by the key its `kid` names (the current
    /// key when it names none), not expired and not before `nbf` (within [`LEEWAY_SECS`]),
    /// issued by [`ISSUER`] for [`AUDIENCE`], no longer-lived than its role allows.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(AuthError::from_jwt)?;
        let key = match header.kid.as_deref() {
            None => &self.keys.current,
            Some(kid) => std::iter::once(&self.keys.current)
                .chain(&self.keys.previous)
                .find(|k| k.kid == kid)
                .ok_or(AuthError::UnknownKey)?,
        };
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &self.keys.validation)
            .map(|data| data.claims)
            .map_err(AuthError::from_jwt)?;
        // Issued in the future: its lifetime would run past its role's cap from now.
        let now = chrono::Utc::now().timestamp();
        if claims.iat > now.saturating_add(LEEWAY_SECS as i64) || claims.exp < claims.iat {
            return Err(AuthError::Malformed);
        }
        if (claims.exp - claims.iat) as u64 > claims.role.max_ttl().as_secs() {
            return Err(AuthError::TooLong);
        }
        // An empty subject or tenant would be the owner of the tasks written before owners
        // existed.
        if claims.owner().trim().is_empty() {
            return Err(AuthError::Malformed);
        }
        Ok(claims)
    }
}

/// The claims of a new token valid for `ttl` from now.
fn claims_for(
    role: Role,
    ttl: Duration,
    subject: &str,
    tenant: Option<&str>,
    patterns: bool,
) -> Claims {
    let iat = chrono::Utc::now().timestamp();
    let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    Claims {
        sub: subject.to_owned(),
        role,
        iat,
        exp: iat.saturating_add(ttl),
        nbf: None,
        iss: ISSUER.to_owned(),
        aud: AUDIENCE.to_owned(),
        patterns,
        tenant: tenant.map(str::to_owned),
    }
}

/// Parses a lifetime such as `90s`, `30m`, `12h` or `7d` (more than zero, at most 366 days).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let unit_at = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit; write e.g. 3600s, 30m, 12h or 7d"))?;
    let (number, unit) = s.split_at(unit_at);
    if number.is_empty() {
        return Err(format!(
            "{s:?} is not a lifetime; write a positive whole number and a unit, e.g. 30m"
        ));
    }
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is too large; the longest lifetime is 366d"))?;
    let secs_per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "{other:?} is not a unit of {s:?}; use s, m, h or d"
            ))
        }
    };
    let ttl = Duration::from_secs(n.saturating_mul(secs_per));
    if ttl.is_zero() {
        return Err("the lifetime must be more than zero".into());
    }
    if ttl > MAX_TTL {
        return Err(format!("{s:?} is too long; the longest lifetime is 366d"));
    }
    Ok(ttl)
}

/// A bearer JWT (get one with `arnela token --role ROLE --ttl 1h`).
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_token")]
pub struct BearerAuth(pub Claims);

async fn check_token(req: &Request, bearer: Bearer) -> poem::Result<Claims> {
    let Some(auth) = req.data::<Auth>() else {
        return Err(super::error::ApiError::internal(&"the API was built without its Auth").into());
    };
    auth.verify(&bearer.token).map_err(|e| {
        // the reason is for the operator's log, not for whoever sent the token
        tracing::info!(reason = %e, "bearer token refused");
        Denied::invalid().into()
    })
}

impl BearerAuth {
    /// The token's claims when its role is one of `allowed` (or admin), else a 403.
    pub fn require(&self, allowed: &[Role]) -> Result<&Claims, Denied> {
        if self.0.role.is_allowed(allowed) {
            return Ok(&self.0);
        }
        let roles: Vec<Role> = allowed
            .iter()
            .copied()
            .chain((!allowed.contains(&Role::Admin)).then_some(Role::Admin))
            .collect();
        let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        let mut body = ErrorBody::new(
            ErrorCode::Forbidden,
            format!(
                "this operation is for the roles {}; the token's role is {}",
                names.join(", "),
                self.0.role
            ),
        );
        body.roles = Some(roles.into_iter().map(RoleName::from).collect());
        Err(Denied::Forbidden(Json(body)))
    }
}

/// The access-control failures, for operations whose errors are not [`ApiError`]
/// (`ApiError` has the same two variants).
///
/// [`ApiError`]: super::error::ApiError
#[derive(Debug, ApiResponse)]
pub enum Denied {
    /// No valid bearer token: it is missing, malformed, expired or not signed with this
    /// service's secret.
    #[oai(status = 401)]
    Unauthorized(
        Json<ErrorBody>,
        /// `Bearer`, with `error="invalid_token"` when a token was sent but refused.
        #[oai(header = "WWW-Authenticate")]
        String,
    ),
    /// The token is valid but its role may not use this operation.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
}

impl Denied {
    /// The request has no bearer token.
    pub fn missing() -> Denied {
        Denied::Unauthorized(
            Json(ErrorBody::new(
                ErrorCode::Unauthorized,
                "a bearer token is required: send `Authorization: Bearer <token>` \
                 (an operator issues one with `arnela token`)",
            )),
            "Bearer realm=\"arnela\"".into(),
        )
    }

    /// A token was sent but refused. The body does not say why (that is logged): a caller
    /// probing tokens learns nothing from it.
    pub fn invalid() -> Denied {
        Denied::Unauthorized(
            Json(ErrorBody::new(
                ErrorCode::Unauthorized,
                "the bearer token was refused: it is malformed, expired, not yet valid, or not \
                 signed for this API (get a new one with `arnela token`)",
            )),
            "Bearer realm=\"arnela\", error=\"invalid_token\"".into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(secret: &str) -> Auth {
        Auth::new(&SecretString::from(secret)).unwrap()
    }

    #[test]
    fn a_minted_token_verifies_with_its_role_and_subject() {
        let a = auth("unit-test-secret");
        let claims = a
            .verify(&a.mint(Role::Auditor, Duration::from_secs(60), "ana"))
            .unwrap();
        assert_eq!((claims.role, claims.sub.as_str()), (Role::Auditor, "ana"));
        assert_eq!(claims.exp - claims.iat, 60);
    }

    #[test]
    fn a_token_of_another_secret_is_refused() {
        let token = auth("one-secret").mint(Role::Admin, Duration::from_secs(60), "x");
        // its key id names a key the verifier does not have
        assert_eq!(
            auth("another-secret").verify(&token),
            Err(AuthError::UnknownKey)
        );
        // and without a key id it does not verify with the current key
        let mut claims = auth("one-secret").verify(&token).unwrap();
        claims.sub = "y".into();
        let unnamed = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"one-secret").unwrap(),
        )
        .unwrap();
        assert_eq!(
            auth("another-secret").verify(&unnamed),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn expiry_is_checked_with_a_few_seconds_of_leeway() {
        let a = auth("unit-test-secret");
        let now = chrono::Utc::now().timestamp();
        let at = |exp: i64| Claims {
            sub: "x".into(),
            role: Role::Admin,
            iat: now - 100,
            exp,
            nbf: None,
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            patterns: false,
            tenant: None,
        };
        assert!(a.verify(&a.sign(&at(now - 2))).is_ok(), "within leeway");
        assert_eq!(
            a.verify(&a.sign(&at(now - 30))),
            Err(AuthError::Expired),
            "beyond leeway"
        );
    }

    #[test]
    fn an_empty_secret_is_refused() {
        assert_eq!(
            Auth::new(&SecretString::from("")).unwrap_err(),
            AuthError::NoSecret
        );
    }

    #[test]
    fn only_admin_may_do_everything() {
        assert!(Role::Admin.is_allowed(&[Role::Producer]));
        assert!(Role::Producer.is_allowed(&[Role::Producer, Role::Auditor]));
        assert!(!Role::Auditor.is_allowed(&[Role::Producer]));
        assert!(!Role::Producer.is_allowed(&[Role::Admin]));
    }

    #[test]
    fn roles_read_their_snake_case_names() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
            assert_eq!(
                serde_json::to_value(r).unwrap(),
                serde_json::json!(r.as_str())
            );
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn lifetimes_read_their_units() {
        for (s, secs) in [
            ("3600s", 3600),
            ("30m", 1800),
            ("12h", 43_200),
            ("7d", 604_800),
            ("366d", 366 * 86_400),
        ] {
            assert_eq!(parse_ttl(s), Ok(Duration::from_secs(secs)), "{s}");
        }
    }

    #[test]
    fn a_zero_negative_unitless_or_overlong_lifetime_is_refused() {
        for s in [
            "0s",
            "0d",
            "-5m",
            "3600",
            "",
            "1w",
            "m",
            "1.5h",
            "367d",
            "99999999999999999999s",
        ] {
            assert!(parse_ttl(s).is_err(), "{s:?} was accepted");
        }
    }
}
