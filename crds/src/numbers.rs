//! Counters carried in status that must not be mixed up: the volume [`Epoch`]
//! (the fencing token every replica persists) and [`ByteCount`]s (resync
//! progress).
//!
//! Both are unsigned in Rust but published to the API server as `int64` with
//! `minimum: 0`: Kubernetes knows no unsigned formats, and a value above
//! `i64::MAX` would not survive the server's JSON handling, so serialization
//! refuses it instead of silently wrapping.

use std::{borrow::Cow, fmt};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

fn non_negative_int64_schema() -> Schema {
    json_schema!({ "type": "integer", "format": "int64", "minimum": 0 })
}

fn serialize_as_int64<S: Serializer>(value: u64, serializer: S) -> Result<S::Ok, S::Error> {
    let value = i64::try_from(value)
        .map_err(|_| serde::ser::Error::custom(format!("{value} does not fit an int64")))?;
    serializer.serialize_i64(value)
}

macro_rules! int64_counter {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(u64);

        impl $name {
            pub const fn new(value: u64) -> Self {
                Self(value)
            }
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serialize_as_int64(self.0, serializer)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                u64::deserialize(deserializer).map(Self)
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
                non_negative_int64_schema()
            }
        }
    };
}

int64_counter!(
    /// The volume epoch: bumped by every frontend (re)assignment; replicas
    /// refuse requests carrying an older one (design invariant 3).
    Epoch
);
int64_counter!(
    /// A number of bytes (resync progress).
    ByteCount
);

impl Epoch {
    /// The epoch after this one. Saturates rather than wrapping: an epoch that
    /// went backwards would un-fence old frontends.
    pub const fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_next_is_greater() {
        assert!(Epoch::new(7).next() > Epoch::new(7));
        assert_eq!(Epoch::new(u64::MAX).next(), Epoch::new(u64::MAX));
    }

    #[test]
    fn counters_round_trip_as_plain_integers() {
        let json = serde_json::to_string(&ByteCount::new(1 << 40)).expect("serializes");
        assert_eq!(json, "1099511627776");
        let back: ByteCount = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, ByteCount::new(1 << 40));
    }

    #[test]
    fn counter_beyond_int64_is_refused_not_wrapped() {
        assert!(serde_json::to_string(&Epoch::new(u64::MAX)).is_err());
    }

    #[test]
    fn negative_counter_does_not_parse() {
        assert!(serde_json::from_str::<Epoch>("-1").is_err());
    }
}
