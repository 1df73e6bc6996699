//! Who may do what: API tokens and their roles.
//!
//! A token is `rw_<id>_<secret>`. The control plane keeps only the id and
//! the sha256 of the secret: a stolen store does not hand out working
//! tokens. Secrets are 256 random bits, so a plain hash is enough; a slow
//! password hash would only slow every request down.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::{SpecError, Timestamp};

/// What a token may do. Each role includes the ones listed after it,
/// except `agent` and `join`, which stand apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything: releases, tokens, and what operators do.
    Admin,
    /// Rollouts and their commands (pause, resume, cancel, rollback,
    /// promote), finalize; and what viewers do.
    Operator,
    /// Reads: the fleet, releases, rollouts, the audit trail, metrics.
    Viewer,
    /// One node's credential: its own session and release downloads.
    Agent,
    /// Enrolls agents: exchanged for an agent credential, nothing else.
    Join,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Operator,
        Role::Viewer,
        Role::Agent,
        Role::Join,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Agent => "agent",
            Role::Join => "join",
        }
    }

    pub fn parse(field: &str, s: &str) -> Result<Role, SpecError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                SpecError::new(
                    field,
                    format!("{s:?} is not a role (admin, operator, viewer, agent, join)"),
                )
            })
    }

    /// Whether this role may make a request that needs `access`.
    pub fn allows(self, access: Access) -> bool {
        match access {
            Access::Public => true,
            Access::Read => matches!(self, Role::Admin | Role::Operator | Role::Viewer),
            Access::Operate => matches!(self, Role::Admin | Role::Operator),
            Access::Admin => self == Role::Admin,
            Access::Download => matches!(
                self,
                Role::Admin | Role::Operator | Role::Viewer | Role::Agent
            ),
            Access::Session => self == Role::Agent,
            Access::Enroll => self == Role::Join,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a route needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token: the health check and the dashboard's static files.
    Public,
    Read,
    Operate,
    Admin,
    /// A release's bytes: readers and agents.
    Download,
    /// An agent's session.
    Session,
    /// Exchanging a join token for an agent credential.
    Enroll,
}

impl Access {
    /// The roles that may, for error messages.
    pub fn roles(self) -> String {
        Role::ALL
            .into_iter()
            .filter(|r| r.allows(self))
            .map(Role::as_str)
            .collect::<Vec<_>>()
            .join(" or ")
    }
}

/// A token as stored: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public, in the token itself: finds the record.
    pub id: String,
    /// Unique; names the token in the audit trail.
    pub name: String,
    pub role: Role,
    /// `agent`: the node this credential belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// sha256 of the secret, hex.
    pub secret_sha256: String,
    pub created_at: Timestamp,
    /// The name of the token that created it.
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Timestamp>,
    /// `join`: how many more enrollments it allows; none: any number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u32>,
}

/// A token as listed: what it is, never its secret or hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Unix milliseconds.
    #[schema(value_type = u64)]
    pub created_at: Timestamp,
    pub created_by: String,
    /// Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub expires_at: Option<Timestamp>,
    /// Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub revoked_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u32>,
}

impl From<&TokenRecord> for TokenView {
    fn from(t: &TokenRecord) -> TokenView {
        TokenView {
            id: t.id.clone(),
            name: t.name.clone(),
            role: t.role,
            node: t.node.clone(),
            created_at: t.created_at,
            created_by: t.created_by.clone(),
            expires_at: t.expires_at,
            revoked_at: t.revoked_at,
            uses_left: t.uses_left,
        }
    }
}

/// Why a presented token does not authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenProblem {
    Malformed,
    Unknown,
    Revoked,
    Expired,
    UsedUp,
}

impl std::fmt::Display for TokenProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenProblem::Malformed => "the token is malformed (expected rw_<id>_<secret>)",
            TokenProblem::Unknown => "the token is not known to this control plane",
            TokenProblem::Revoked => "the token was revoked",
            TokenProblem::Expired => "the token has expired",
            TokenProblem::UsedUp => "the join token was already used",
        })
    }
}

impl TokenRecord {
    /// Checks `secret` (the token's last part) against this record at `now`.
    pub fn check(&self, secret: &str, now: Timestamp) -> Result<(), TokenProblem> {
        // Comparing hashes, not secrets: timing can reveal at most a prefix
        // of a hash, which does not help forge the secret.
        if hash_secret(secret) != self.secret_sha256 {
            return Err(TokenProblem::Unknown);
        }
        if self.revoked_at.is_some() {
            return Err(TokenProblem::Revoked);
        }
        if self.expires_at.is_some_and(|at| now >= at) {
            return Err(TokenProblem::Expired);
        }
        if self.uses_left == Some(0) {
            return Err(TokenProblem::UsedUp);
        }
        Ok(())
    }

    /// Neither revoked, expired nor used up at `now`.
    pub fn is_live(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none()
            && self.expires_at.is_none_or(|at| now < at)
            && self.uses_left != Some(0)
    }
}

/// Splits `rw_<id>_<secret>` into its id and secret.
pub fn split_token(token: &str) -> Result<(&str, &str), TokenProblem> {
    let rest = token
        .trim()
        .strip_prefix("rw_")
        .ok_or(TokenProblem::Malformed)?;
    let (id, secret) = rest.split_once('_').ok_or(TokenProblem::Malformed)?;
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(id) || id.len() > 32 || !hex(secret) || secret.len() > 128 {
        return Err(TokenProblem::Malformed);
    }
    Ok((id, secret))
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Long enough for `agent@` and the longest node name.
pub const MAX_TOKEN_NAME: usize = 160;

/// Token names: shown in the audit trail and typed on command lines.
pub fn validate_token_name(field: &str, s: &str) -> Result<(), SpecError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_TOKEN_NAME
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("{s:?} is not a token name: use 1-{MAX_TOKEN_NAME} characters of a-z, A-Z, 0-9, '-', '_', '.', '@'"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(secret: &str) -> TokenRecord {
        TokenRecord {
            id: "ab12".into(),
            name: "ci".into(),
            role: Role::Operator,
            node: None,
            secret_sha256: hash_secret(secret),
            created_at: 0,
            created_by: "admin".into(),
            expires_at: Some(1000),
            revoked_at: None,
            uses_left: None,
        }
    }

    #[test]
    fn roles_include_what_they_should() {
        use Access::*;
        let may = |r: Role| {
            [Public, Read, Operate, Admin, Download, Session, Enroll]
                .into_iter()
                .filter(|a| r.allows(*a))
                .collect::<Vec<_>>()
        };
        assert_eq!(may(Role::Admin), [Public, Read, Operate, Admin, Download]);
        assert_eq!(may(Role::Operator), [Public, Read, Operate, Download]);
        assert_eq!(may(Role::Viewer), [Public, Read, Download]);
        assert_eq!(may(Role::Agent), [Public, Download, Session]);
        assert_eq!(may(Role::Join), [Public, Enroll]);
        assert_eq!(Operate.roles(), "admin or operator");
    }

    #[test]
    fn tokens_split_and_check() {
        assert_eq!(split_token("rw_ab12_ff00").unwrap(), ("ab12", "ff00"));
        for bad in [
            "",
            "ab12_ff",
            "rw_ab12",
            "rw__ff",
            "rw_ab12_",
            "rw_zz_ff",
            "rw_ab_f f",
        ] {
            assert_eq!(split_token(bad), Err(TokenProblem::Malformed), "{bad:?}");
        }
        let mut t = record("ff00");
        assert_eq!(t.check("ff00", 999), Ok(()));
        assert_eq!(t.check("ff01", 999), Err(TokenProblem::Unknown));
        assert_eq!(t.check("ff00", 1000), Err(TokenProblem::Expired));
        t.revoked_at = Some(5);
        assert_eq!(t.check("ff00", 10), Err(TokenProblem::Revoked));
        t.revoked_at = None;
        t.uses_left = Some(0);
        assert_eq!(t.check("ff00", 10), Err(TokenProblem::UsedUp));
        assert!(!t.is_live(10));
    }

    #[test]
    fn names_and_roles_are_checked() {
        assert!(validate_token_name("name", "ci-bot@team").is_ok());
        // Every node's credential is named after it.
        let longest_node = "n".repeat(128);
        assert!(validate_token_name("name", &format!("agent@{longest_node}")).is_ok());
        assert!(validate_token_name("name", &"n".repeat(MAX_TOKEN_NAME + 1)).is_err());
        let e = validate_token_name("name", "a b").unwrap_err().to_string();
        assert!(e.starts_with("name: "), "{e}");
        let e = Role::parse("role", "root").unwrap_err().to_string();
        assert!(e.contains("\"root\" is not a role"), "{e}");
        assert_eq!(Role::parse("role", "viewer").unwrap(), Role::Viewer);
    }
}
