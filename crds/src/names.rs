//! Names that must not be confused with one another: the name of a [`Site`],
//! the name of a Kubernetes node, and the path of a Site's storage pool.
//!
//! Each is a newtype whose constructor checks the same rule the API server
//! enforces through the CRD schema (the `pattern`/`maxLength` emitted by the
//! `JsonSchema` impls below), so a value built in Rust is one the server
//! accepts and a value read from the server parses.
//!
//! [`Site`]: crate::Site

use std::{borrow::Cow, fmt};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Longest DNS-1123 subdomain, the limit on Kubernetes object names.
pub const MAX_NAME_LEN: usize = 253;
/// Longest pool path accepted (Linux `PATH_MAX`).
pub const MAX_POOL_PATH_LEN: usize = 4096;

/// The regular expression of a DNS-1123 subdomain, as the API server checks it.
const DNS1123_SUBDOMAIN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Why a name or path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "{what} {value:?} is not a DNS-1123 subdomain (lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters)"
    )]
    NotDnsSubdomain { what: &'static str, value: String },
    #[error("pool path {value:?} must be an absolute path of at most 4096 bytes without NUL")]
    BadPoolPath { value: String },
}

fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || *b == b'-')
        }
        _ => false,
    }
}

fn is_dns_subdomain(value: &str) -> bool {
    !value.is_empty() && value.len() <= MAX_NAME_LEN && value.split('.').all(is_dns_label)
}

fn subdomain_schema() -> Schema {
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_NAME_LEN,
        "pattern": DNS1123_SUBDOMAIN,
    })
}

macro_rules! dns_name {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks that `value` is a DNS-1123 subdomain.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                if is_dns_subdomain(&value) {
                    Ok(Self(value))
                } else {
                    Err(NameError::NotDnsSubdomain { what: $what, value })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn inline_schema() -> bool {
                true
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                subdomain_schema()
            }
        }
    };
}

dns_name!(
    /// The name of a `Site` object (cluster-scoped, so unique in the cluster).
    SiteName,
    "site name"
);
dns_name!(
    /// The name of a Kubernetes `Node`.
    NodeName,
    "node name"
);

/// Where a Site's replicas keep their data on its nodes: a directory (one
/// preallocated file per replica) or a block device. Which of the two is
/// decided by the node plugin when it looks at the path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PoolPath(String);

impl PoolPath {
    /// Checks the path is absolute, not too long and free of NUL bytes.
    pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
        let value = value.into();
        if value.starts_with('/') && value.len() <= MAX_POOL_PATH_LEN && !value.contains('\0') {
            Ok(Self(value))
        } else {
            Err(NameError::BadPoolPath { value })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PoolPath {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, NameError> {
        Self::new(value)
    }
}

impl From<PoolPath> for String {
    fn from(path: PoolPath) -> String {
        path.0
    }
}

impl fmt::Display for PoolPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for PoolPath {
    fn schema_name() -> Cow<'static, str> {
        "PoolPath".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // The absolute-path rule is a CEL rule on the field (see `SiteSpec`)
        // so that its message can name `spec.pool`.
        json_schema!({ "type": "string", "minLength": 1, "maxLength": MAX_POOL_PATH_LEN })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_name_accepts_dns_subdomains() {
        for ok in ["room-a", "a", "zone-1.example", "0abc"] {
            assert_eq!(SiteName::new(ok).expect(ok).as_str(), ok);
        }
    }

    #[test]
    fn site_name_rejects_what_the_api_server_rejects() {
        let long = "a".repeat(254);
        for bad in ["", "Room-A", "-a", "a-", "a..b", "a_b", ".a", long.as_str()] {
            assert!(SiteName::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn deserializing_a_bad_node_name_fails() {
        let err = serde_json::from_str::<NodeName>("\"Node_1\"").expect_err("must fail");
        assert!(err.to_string().contains("DNS-1123"), "{err}");
        let ok: NodeName = serde_json::from_str("\"node-1\"").expect("valid");
        assert_eq!(
            serde_json::to_string(&ok).expect("serializes"),
            "\"node-1\""
        );
    }

    #[test]
    fn pool_path_must_be_absolute() {
        assert!(PoolPath::new("/var/lib/twinvol").is_ok());
        assert!(PoolPath::new("/dev/sdb").is_ok());
        assert!(PoolPath::new("var/lib").is_err());
        assert!(PoolPath::new("").is_err());
        assert!(PoolPath::new("/a\0b").is_err());
    }

    #[test]
    fn the_schema_pattern_is_the_constructor_rule() {
        let schema = serde_json::to_value(SiteName::json_schema(&mut SchemaGenerator::default()))
            .expect("schema serializes");
        assert_eq!(schema["pattern"], DNS1123_SUBDOMAIN);
        assert_eq!(schema["maxLength"], MAX_NAME_LEN);
    }
}
